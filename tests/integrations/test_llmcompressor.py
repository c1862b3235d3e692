"""llm-compressor's GPTQModifier on the maca_kernels backend, through the tool's own ``oneshot`` on a tiny
Llama (runs in the llm-compressor venv: ``make interop``; skipped elsewhere)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("llmcompressor")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402
from datasets import Dataset  # noqa: E402
from llmcompressor import oneshot  # noqa: E402
from llmcompressor.modifiers.gptq import (
    GPTQModifier,  # noqa: E402
    base,  # noqa: E402
)

from maca_kernels import _native  # noqa: E402
from maca_kernels.integrations import llmcompressor as mk_llmc  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tool_models import LENGTHS, calibration, save_tiny_model  # noqa: E402


def recipe(sym=False, actorder=None, strategy="group", num_bits=4, type_="int"):
    weights = QuantizationArgs(num_bits=num_bits, type=type_, symmetric=sym, strategy=strategy,
                               group_size=32 if strategy == "group" else None)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    return GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], actorder=actorder,
                        block_size=128, dampening_frac=0.01)


class Spy:
    """Per-module GPTQ losses (the tool's CompressionLogger), hook inputs and the Hessians handed to the
    solve, keyed by module name."""

    def __init__(self, monkeypatch):
        self.losses, self.inputs, self.hessians, self.names = {}, {}, {}, {}
        spy = self
        cal, prep, setres = GPTQModifier.calibrate_module, base.prepare_batch, base.CompressionLogger.set_results

        def calibrate_module(self_, module, args, out):
            spy.names[module] = self_._module_names[module]
            spy.inputs.setdefault(spy.names[module], []).append(args[0].detach().double().clone())
            return cal(self_, module, args, out)

        def prepare_batch(batch, *a, **k):
            res = prep(batch, *a, **k)
            for i, m in enumerate(batch):
                spy.hessians[spy.names[m]] = res[1][i].double().clone()
            return res

        def set_results(self_, name=None, loss=None):
            if name == "GPTQ":
                spy.losses[spy.names[self_.module]] = loss
            return setres(self_, name=name, loss=loss)

        monkeypatch.setattr(GPTQModifier, "calibrate_module", calibrate_module)
        monkeypatch.setattr(base, "prepare_batch", prepare_batch)
        monkeypatch.setattr(base.CompressionLogger, "set_results", set_results)


def run(model_dir, recipe_, monkeypatch, weighting=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    seqs = calibration()
    ds = Dataset.from_dict({"input_ids": seqs, "attention_mask": [[1] * len(s) for s in seqs]})
    spy = Spy(monkeypatch)
    kwargs = dict(model=model, dataset=ds, recipe=recipe_, batch_size=1, num_calibration_samples=len(seqs),
                  shuffle_calibration_samples=False, max_seq_length=max(LENGTHS), pipeline="sequential")
    if weighting is None:
        oneshot(**kwargs)
    else:
        with mk_llmc.backend(weighting=weighting):
            oneshot(**kwargs)
    return model, spy


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llmc"))


CONFIGS = [
    dict(),
    dict(sym=True, actorder="static"),
    dict(num_bits=3, actorder="weight"),
    dict(num_bits=2, strategy="channel"),
    dict(num_bits=8, sym=True, strategy="tensor"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_per_module_losses_match_the_tool(model_dir, monkeypatch, cfg):
    _, theirs = run(model_dir, recipe(**cfg), monkeypatch)
    ours_model, ours = run(model_dir, recipe(**cfg), monkeypatch, weighting="token")
    assert set(ours.losses) == set(theirs.losses) and len(ours.losses) == 14
    for name, loss in theirs.losses.items():
        assert ours.losses[name] == pytest.approx(loss, rel=0.01), name
    # the tool's statistic reproduced: 2/rows · Σ xxᵀ over every token of the batch rows
    for name, xs in ours.inputs.items():
        X = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
        expect = 2.0 / len(xs) * X.T @ X
        assert torch.allclose(ours.hessians[name], expect, rtol=1e-5, atol=1e-5 * float(expect.abs().max()))
    assert base.quantize_weight is not mk_llmc._quantize_weight, "patch removed on exit"


def test_sequence_weighting_feeds_the_maca_hessian(model_dir, monkeypatch):
    _, spy = run(model_dir, recipe(), monkeypatch, weighting="sequence")
    assert len(spy.hessians) == 14
    for name, xs in spy.inputs.items():
        assert [x.shape[1] for x in xs] == sorted(LENGTHS, reverse=True)  # every sequence once, unpadded
        expect = sum(x[0].T @ x[0] / x.shape[1] for x in xs) * (2.0 / len(xs))
        got = spy.hessians[name]
        assert torch.allclose(got, expect, rtol=1e-5, atol=1e-5 * float(expect.abs().max())), name


def test_the_tools_save_and_load_work_on_our_result(model_dir, monkeypatch, tmp_path):
    from compressed_tensors.quantization import QuantizationConfig  # noqa: F401  (the format's reader)
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model, _ = run(model_dir, recipe(actorder="static"), monkeypatch, weighting="sequence")
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("_proj")}
    ids = torch.tensor([calibration()[0]])
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path / "q", save_compressed=True)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu",
                                                quantization_config=CompressedTensorsConfig(dequantize=True))
    for n, m in back.named_modules():
        if n in weights:
            assert torch.equal(m.weight.detach(), weights[n]), n
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, logits, atol=1e-5)


def test_unsupported_option_raises_and_the_patch_is_undone(model_dir, monkeypatch):
    original = base.quantize_weight
    with pytest.raises(mk_llmc.UnsupportedOption, match="weight type 'float'"):
        run(model_dir, recipe(num_bits=8, type_="float", sym=True, strategy="channel"), monkeypatch,
            weighting="token")
    assert base.quantize_weight is original and base.accumulate_hessian is not mk_llmc._accumulate_hessian
    assert not mk_llmc.is_enabled()


def test_a_backend_failure_mid_run_shows_the_original_error_and_restores_the_tool(model_dir, monkeypatch):
    before = dict(vars(base))
    mk_llmc.enable("sequence")
    try:
        patched = {n for n, v in vars(base).items() if before.get(n) is not v}
    finally:
        mk_llmc.disable()
    assert patched >= {"accumulate_hessian", "quantize_weight"}
    _, expect = run(model_dir, recipe(), monkeypatch)  # the tool's own run, before any failure
    # the C++ extension missing: our first accumulation (inside the tool's calibration hook) fails
    monkeypatch.setattr(_native, "_C", None)
    with pytest.raises(RuntimeError) as missing:
        _native.require_native("accumulate_hessian")
    with pytest.raises(BaseException) as err:
        run(model_dir, recipe(), monkeypatch, weighting="sequence")
    assert type(err.value) is RuntimeError and str(err.value) == str(missing.value), "the original error, as is"
    assert not getattr(err.value, "__notes__", None), "and the cleanup had nothing to add"
    assert not mk_llmc.is_enabled()
    assert {n for n in patched if vars(base).get(n) is not before.get(n)} == set(), "every patch undone"
    # the user's next plain run is the tool's own (it never reaches our ops: the extension is still "missing")
    _, got = run(model_dir, recipe(), monkeypatch)
    assert got.losses == pytest.approx(expect.losses, rel=1e-6) and len(got.losses) == 14


def test_enable_disable_are_scoped():
    original = (base.accumulate_hessian, base.quantize_weight)
    mk_llmc.enable("sequence")
    try:
        with pytest.raises(RuntimeError, match="already enabled"):
            mk_llmc.enable("token")
        assert base.quantize_weight is mk_llmc._quantize_weight
    finally:
        mk_llmc.disable()
    assert (base.accumulate_hessian, base.quantize_weight) == original
    mk_llmc.disable()  # a no-op
    with pytest.raises(ValueError, match="weighting must be one of"):
        mk_llmc.enable("tokens")
    assert not mk_llmc.is_enabled()


def test_a_non_finite_hessian_falls_back_to_round_to_nearest_as_the_tool_does():
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    g = torch.Generator().manual_seed(0)
    W = torch.randn(1, 32, 64, generator=g) * 0.1
    X = torch.randn(256, 64, generator=g)
    H = (2 * X.T @ X / 256)[None].clone()
    H[0, 3, 3] = float("nan")
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="channel")
    scale = W.abs().amax(-1, keepdim=True) / 7.5
    zp = torch.zeros_like(scale, dtype=torch.int8)
    expect = quantize_weight(W.clone(), H.clone(), scale, zp, None, args)
    with mk_llmc.backend("token"):
        got = base.quantize_weight(weights=W.clone(), hessians=H.clone(), scale=scale, zero_point=zp,
                                   global_scale=None, quant_args=args)
    assert bool(expect[2][0]) and bool(got[2][0]), "flagged as a round-to-nearest fallback"
    assert torch.allclose(got[0], expect[0], atol=1e-7) and torch.allclose(got[1], expect[1], rtol=1e-5)
