"""No floating matrix of a decoder layer is left in float silently: fused MoE experts (transformers 5) are quantized
(test_moe.py) or, in a variant the pipeline does not reproduce, refused before any work unless keep_float names
them; other 3-D parameters are refused the same way; routers and norms stay in float by policy; keep_float also
keeps chosen Linears in float, recorded in the checkpoint's meta."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import random_sequences, tiny_model, tiny_moe  # noqa: E402

import maca_kernels as mk  # noqa: E402
from maca_kernels.layer_policy import UncoveredParameterError  # noqa: E402
from maca_kernels.nn import QuantLinear  # noqa: E402
from maca_kernels.pipeline import quantize_model  # noqa: E402
from maca_kernels.pipeline.experts import UnsupportedExpertsError  # noqa: E402

KW = dict(bits=4, group_size=32, progress=False, log=None)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_unsupported_experts_and_stray_matrices_refused_before_any_work(family, monkeypatch):
    import maca_kernels.pipeline.run as pl

    monkeypatch.setattr(pl, "capture_first_inputs", lambda *a: pytest.fail("work started"))
    model = tiny_moe(family)
    experts = model.model.layers[1].mlp.experts
    experts.gate_up_proj_bias = torch.nn.Parameter(torch.zeros(4, experts.gate_up_proj.shape[1]))  # GPT-OSS-like
    with pytest.raises(UnsupportedExpertsError, match=r"model.layers.1.mlp.experts \(\w+Experts\): parameters "
                                                      r"\['down_proj', 'gate_up_proj', 'gate_up_proj_bias'\].*"
                                                      r"keep_float=\('experts',\)"):
        quantize_model(model, random_sequences([16, 32], seed=1), **KW)
    model = tiny_moe(family)
    model.model.layers[0].mlp.lookup = torch.nn.Module()
    model.model.layers[0].mlp.lookup.table = torch.nn.Parameter(torch.zeros(2, 3, 4))
    with pytest.raises(UncoveredParameterError, match=r"model.layers.0.mlp.lookup.table \[2, 3, 4\] \(Module\)"):
        quantize_model(model, random_sequences([16, 32], seed=1), **KW)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_keep_float_experts_knowingly(family, tmp_path):
    model = tiny_moe(family)
    experts = {k: v.clone() for k, v in model.state_dict().items() if ".experts." in k or k.endswith("gate.weight")}
    quantize_model(model, random_sequences([16, 32], seed=1), keep_float=("experts",), **KW)
    names = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert names == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj",
                                                                                     "o_proj")}
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in experts.items())  # experts and routers untouched, in float
    assert model.config.quantization_config["meta"]["keep_float"] == ["experts"]
    out = mk.save_quantized(model, tmp_path / "ck")
    loaded = mk.load_quantized(out, dtype=torch.float32)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_keep_float_linears_and_bad_patterns():
    model = tiny_model(seed=0)
    before = model.model.layers[1].mlp.down_proj.weight.clone()
    quantize_model(model, random_sequences([16, 32], seed=1), keep_float=("layers.1.mlp.down_proj",), **KW)
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    assert isinstance(model.model.layers[1].mlp.down_proj, torch.nn.Linear)
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, before)
    with pytest.raises(ValueError, match="keep_float must be a sequence"):
        quantize_model(tiny_model(seed=0), None, method="rtn", keep_float="experts", **KW)


def test_cli(tmp_path, capsys):
    from maca_kernels.cli import main

    tiny_moe("mixtral").save_pretrained(tmp_path / "moe")
    q = ["quantize", "--model", str(tmp_path / "moe"), "--method", "rtn", "--group-size", "32"]
    assert main([*q, "--out", str(tmp_path / "a")]) == 0  # the experts quantized
    with __import__("safetensors").safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as f:
        assert "model.layers.1.mlp.experts.3.down_proj.qweight" in f.keys()
    assert main([*q, "--out", str(tmp_path / "b"), "--keep-float", "experts"]) == 0
    assert (tmp_path / "b" / "model.safetensors").exists()
