"""quantize_model on tiny random-weight models built in the test: the Hessians it uses, sequential order,
resume after an interruption (bit for bit), GPTAQ, RTN and other architectures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import random_sequences, tiny_model  # noqa: E402

import maca_kernels as mk  # noqa: E402
from maca_kernels.nn import QuantLinear  # noqa: E402
from maca_kernels.pipeline import quantize_model  # noqa: E402

LENGTHS = [16, 16, 32, 48, 64, 64, 64]  # several lengths, so sequence weighting differs from token weighting


def module_inputs(model, name: str, sequences) -> list[torch.Tensor]:
    """The input of module ``name`` for each sequence run through the model on its own."""
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0][0].detach()))
    try:
        with torch.no_grad():
            for s in sequences:
                model(input_ids=s[None])
    finally:
        handle.remove()
    return seen


def hand_hessian(xs: list[torch.Tensor], weighting: str) -> torch.Tensor:
    """2/N · Σ_s w_s X_sᵀX_s in float64, one sequence at a time."""
    total = sum(((1.0 / x.shape[0]) if weighting == "sequence" else 1.0) * (x.double().T @ x.double()) for x in xs)
    n = len(xs) if weighting == "sequence" else sum(x.shape[0] for x in xs)
    return total * 2.0 / n


def collect(**kw):
    model = tiny_model(seed=kw.pop("seed", 0))
    calib = random_sequences(LENGTHS, seed=1)
    seen = {}
    quantize_model(model, calib, progress=False, log=None,
                   callback=lambda name, H, r: seen.__setitem__(name, (H.clone() if H is not None else None, r)),
                   **kw)
    return model, calib, seen


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("weighting", ["sequence", "token"])
def test_first_layer_hessian_equals_hand_computed(weighting):
    fp = tiny_model(seed=0)
    model, calib, seen = collect(bits=4, group_size=32, weighting=weighting)
    name = "model.layers.0.self_attn.q_proj"
    want = hand_hessian(module_inputs(fp, name, calib), weighting)
    assert rel(seen[name][0], want) <= 1e-6
    other = "token" if weighting == "sequence" else "sequence"
    assert rel(seen[name][0], hand_hessian(module_inputs(fp, name, calib), other)) > 1e-3  # weighting matters
    # q, k and v share their input: one Hessian for the group
    H_q = seen["model.layers.0.self_attn.q_proj"][0]
    assert torch.equal(H_q, seen["model.layers.0.self_attn.k_proj"][0])
    assert torch.equal(H_q, seen["model.layers.0.self_attn.v_proj"][0])


def test_sequential_order_inputs_come_from_quantized_modules():
    """down_proj of layer 0 sees the quantized gate/up; layer 1 sees the quantized layer 0."""
    fp = tiny_model(seed=0)
    model, calib, seen = collect(bits=3, group_size=32)
    staged = tiny_model(seed=0)
    for name, (_, r) in seen.items():
        if name.startswith("model.layers.0.") and not name.endswith("down_proj"):
            staged.get_submodule(name).weight.data.copy_(r.weight)
    name = "model.layers.0.mlp.down_proj"
    assert rel(seen[name][0], hand_hessian(module_inputs(staged, name, calib), "sequence")) <= 1e-6
    fp_H = hand_hessian(module_inputs(fp, name, calib), "sequence")
    assert rel(seen[name][0], fp_H) > 1e-4  # the order matters, so the test can fail
    staged.get_submodule("model.layers.0.mlp.down_proj").weight.data.copy_(seen["model.layers.0.mlp.down_proj"][1].weight)
    name = "model.layers.1.self_attn.q_proj"
    assert rel(seen[name][0], hand_hessian(module_inputs(staged, name, calib), "sequence")) <= 1e-6


def test_result_modules_and_logits():
    fp = tiny_model(seed=0)
    model, calib, seen = collect(bits=4, group_size=32, act_order=True)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, QuantLinear)
    for name, (_, r) in seen.items():
        layer = model.get_submodule(name)
        x = torch.randn(3, layer.in_features)
        assert rel(layer(x), x.double() @ r.weight.double().T) <= 1e-5
    cfg = model.config.quantization_config
    assert cfg["bits"] == 4 and cfg["desc_act"] and cfg["meta"]["weighting"] == "sequence"
    ids = torch.randint(0, 96, (2, 24))
    with torch.no_grad():
        assert rel(model(ids).logits, fp(ids).logits) < 0.5


def test_gptq_beats_rtn_on_the_calibration_objective():
    _, _, gptq = collect(bits=3, group_size=32)
    _, _, rtn = collect(bits=3, group_size=32, method="rtn")
    for name, (H, r) in gptq.items():
        w_rtn = rtn[name][1].weight
        W = tiny_model(seed=0).get_submodule(name).weight if name.startswith("model.layers.0.self_attn") else None
        if W is not None:  # first layer's attention: the same fp weights and H for both
            d = (W.detach() - w_rtn).double()
            rtn_loss = float(((d @ H.double()) * d).sum())
            assert r.loss <= rtn_loss


def test_rtn_equals_the_quantizer_alone():
    fp = tiny_model(seed=0)
    model, _, seen = collect(bits=4, group_size=32, method="rtn", sym=True)
    for name, (H, r) in seen.items():
        assert H is None
        want = mk.rtn_quantize(fp.get_submodule(name).weight.detach(), 4, 32, sym=True)
        assert torch.equal(r.codes, want.codes) and torch.equal(r.weight, want.weight)


def test_gptaq_runs_and_differs_from_gptq():
    _, _, gptaq = collect(bits=3, group_size=32, method="gptaq")
    _, _, gptq = collect(bits=3, group_size=32)
    name = "model.layers.1.mlp.down_proj"
    assert not torch.equal(gptaq[name][1].codes, gptq[name][1].codes)


def test_resume_after_interruption_is_bit_identical(tmp_path):
    full, _, _ = collect(bits=4, group_size=32, method="gptaq")

    class Boom(Exception):
        pass

    def stop_at_layer_1(name, H, r):
        if name.startswith("model.layers.1."):
            raise Boom

    calib = random_sequences(LENGTHS, seed=1)
    with pytest.raises(Boom):
        quantize_model(tiny_model(seed=0), calib, bits=4, group_size=32, method="gptaq", resume_dir=str(tmp_path),
                       progress=False, log=None, callback=stop_at_layer_1)
    assert (tmp_path / "layer_0000.safetensors").exists() and not (tmp_path / "layer_0001.safetensors").exists()
    lines = []
    resumed = quantize_model(tiny_model(seed=0), calib, bits=4, group_size=32, method="gptaq",
                             resume_dir=str(tmp_path), progress=False, log=lines.append)
    assert any("resuming after layer 0" in line for line in lines)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(ValueError, match="other arguments"):
        quantize_model(tiny_model(seed=0), calib, bits=3, group_size=32, method="gptaq", resume_dir=str(tmp_path),
                       progress=False, log=None)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "gemma2", "gemma3"])
def test_other_architectures(family):
    fp = tiny_model(family, seed=2)
    model = tiny_model(family, seed=2)
    quantize_model(model, random_sequences([16, 32, 32], seed=3), bits=4, group_size=32, progress=False, log=None)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in fp.model.layers.modules())
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == n_linear
    ids = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        out, want = model(ids).logits, fp(ids).logits
    assert torch.isfinite(out).all() and rel(out, want) < 0.5


def test_overrides_and_errors():
    model = tiny_model(seed=0)
    quantize_model(model, random_sequences([16, 32], seed=1), bits=4, group_size=32,
                   overrides={"down_proj": {"bits": 8, "group_size": 64}}, progress=False, log=None)
    assert model.model.layers[0].mlp.down_proj.bits == 8 and model.model.layers[0].mlp.up_proj.bits == 4
    with pytest.raises(ValueError, match="method must be one of"):
        quantize_model(tiny_model(), [], method="awq")
    with pytest.raises(ValueError, match="no sequences"):
        quantize_model(tiny_model(), [], group_size=32, progress=False, log=None)
    with pytest.raises(ValueError, match=r"divisor of in_features = 64, got 128 \(model.layers.0.self_attn.q_proj\)"):
        quantize_model(tiny_model(), [], progress=False, log=None)  # before anything else runs
    with pytest.raises(ValueError, match="unsupported architecture"):
        quantize_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), [torch.arange(4)], progress=False, log=None)


def test_save_load_same_logits(tmp_path):
    model, _, _ = collect(bits=3, group_size=32, act_order=True)
    mk.save_quantized(model, tmp_path / "ckpt")
    loaded = mk.load_quantized(tmp_path / "ckpt", dtype=torch.float32)
    ids = torch.randint(0, 96, (2, 24))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    meta = loaded.config.quantization_config["meta"]
    assert meta["method"] == "gptq" and meta["weighting"] == "sequence"


def test_stats_say_what_each_part_held():
    """quantize_stats.memory_mb: the most each part held at once (GPTAQ: two working copies, two streams, the
    Hessian and the cross term as fp32 sums, float64 totals and fp32 means)."""
    model = tiny_model(seed=0, layers=2)
    layer_bytes = sum(t.numel() * 4 for t in model.model.layers[0].state_dict().values())
    quantize_model(model, random_sequences([16, 32, 32], seed=1), 4, 32, method="gptaq", progress=False, log=None)
    mem = model.quantize_stats.memory_mb
    assert mem["layer"] == round(2 * layer_bytes / 2**20, 3)
    assert mem["activations"] == round(2 * 80 * 64 * 4 / 2**20, 3)  # 80 tokens of hidden 64, both streams
    assert mem["hessian"] == round(2 * (4 + 8 + 4) * 128**2 / 2**20, 3)  # down_proj's input: d = 128
    assert "solve" not in mem  # measured on CUDA only


def test_solver_settings_and_overrides_checked_before_any_forward():
    model = tiny_model("llama")
    calls = []
    model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    seqs = random_sequences([16, 16])
    cases = [(dict(damp=-1), "damp must be a fraction ≥ 0"), (dict(reg=float("nan")), "reg must be a number"),
             (dict(alpha=-0.5), "alpha must be a number ≥ 0"), (dict(block_size=1.5), "block_size must be"),
             (dict(mse=1), "mse must be a bool"),
             (dict(overrides={"down_proj": {"bits": 5}}), r"overrides\['down_proj'\]: bits must be one of"),
             (dict(overrides={"down_proj": {"sym": True}}), "only bits and group_size can differ")]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            quantize_model(model, seqs, 4, 16, progress=False, log=None, **kw)
    assert not calls


def test_reg_auto_takes_the_studys_lambda_for_each_modules_bits():
    """The default reg="auto": each module is solved with STUDY_REG[its bits] (here 4 and, by override, 3); the
    checkpoint's meta names them; reg=0 is the classic solve."""
    from maca_kernels.pipeline.run import STUDY_REG

    seqs = random_sequences([16, 16, 32])
    seen = {}
    model = quantize_model(tiny_model("llama"), seqs, 4, 16, progress=False, log=None,
                           overrides={"down_proj": {"bits": 3}},
                           callback=lambda n, H, r: seen.__setitem__(n, (H, r)))
    assert model.config.quantization_config["meta"]["reg"] == {"3": STUDY_REG[3], "4": STUDY_REG[4]}
    fresh = tiny_model("llama")
    for name in ("model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"):
        H, r = seen[name]
        W = fresh.get_submodule(name).weight.detach()
        for reg, same in ((STUDY_REG[r.bits], True), (0, False)):
            want = mk.gptq_quantize(W, H, bits=r.bits, group_size=16, reg=reg)
            assert torch.equal(want.codes, r.codes) == same, (name, reg)
