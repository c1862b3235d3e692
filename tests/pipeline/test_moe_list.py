"""Experts kept as a ModuleList of per-expert MLPs (older modelling code, remote-code models): found by structure,
each expert's Hessians from the rows its block hands it (against float64 sums by hand), every expert quantized, the
checkpoint the fused model's reader loads, and variants the pipeline cannot read refused before any work."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_moe import KW, SEQS, close, hand  # noqa: E402
from tiny_models import ListExpert, random_sequences, tiny_moe  # noqa: E402

import maca_kernels as mk  # noqa: E402
from maca_kernels.nn import QuantLinear  # noqa: E402
from maca_kernels.pipeline import quantize_model  # noqa: E402
from maca_kernels.pipeline.experts import UnsupportedExpertsError, rows_of  # noqa: E402

EXPERTS = "model.layers.0.mlp.experts"
NAMES = {"list": ("gate_proj", "up_proj", "down_proj"), "list_w123": ("w1", "w3", "w2")}


def run(family: str, **kw):
    model, seen = tiny_moe(family), {}
    quantize_model(model, random_sequences(SEQS, seed=1), callback=lambda n, H, r: seen.__setitem__(n, (H, r)),
                   keep_float=kw.pop("keep_float", ("self_attn",)), **KW, **kw)
    return model, seen


def per_expert_rows(family: str) -> list[list[torch.Tensor]]:
    """Float64 rows each expert of layer 0 is called with, per calibration sequence (the float model, one sequence
    at a time: independent of how the pipeline batches and finds them)."""
    model = tiny_moe(family)
    rows: list[list[torch.Tensor]] = [[] for _ in range(4)]
    for s in random_sequences(SEQS, seed=1):
        got = [None] * 4
        hooks = [m.register_forward_pre_hook(lambda mod, a, e=e, got=got: got.__setitem__(e, a[0].double()))
                 for e, m in enumerate(model.model.layers[0].mlp.experts)]
        with torch.no_grad():
            model(s[None])
        for h in hooks:
            h.remove()
        for e in range(4):
            if got[e] is not None:
                rows[e].append(got[e])
    return rows


@pytest.mark.parametrize("family", ["list", "list_w123"])
@pytest.mark.parametrize("weighting", ["sequence", "token"])
def test_each_experts_hessians_are_the_rows_its_block_gives_it(family, weighting):
    model, seen = run(family, weighting=weighting, moe_min_tokens=0)
    gate, up, down = NAMES[family]
    stats = model.quantize_stats.experts[EXPERTS]
    act = tiny_moe(family).model.layers[0].mlp.act
    for e, mine in enumerate(per_expert_rows(family)):
        assert stats["tokens"][e] == sum(len(x) for x in mine) and stats["sequences"][e] == len(mine)
        H = seen[f"{EXPERTS}.{e}.{gate}"][0]
        assert close(H, hand(mine, weighting)) and torch.equal(H, seen[f"{EXPERTS}.{e}.{up}"][0])
        Wg, Wu = (seen[f"{EXPERTS}.{e}.{p}"][1].weight.double() for p in (gate, up))
        assert close(seen[f"{EXPERTS}.{e}.{down}"][0], hand([act(x @ Wg.T) * (x @ Wu.T) for x in mine], weighting))


@pytest.mark.parametrize("method", ["gptq", "gptaq", "rtn"])
def test_every_expert_quantized_and_the_forward_matches_the_dequantized_weights(method):
    model, seen = run("list_w123", method=method, keep_float=())
    names = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert names == {f"model.layers.{i}.{p}" for i in range(2) for p in
                     [f"self_attn.{x}_proj" for x in "qkvo"] + [f"mlp.experts.{e}.w{j}" for e in range(4)
                                                                for j in (1, 2, 3)]}
    assert {type(layer.mlp.gate) for layer in model.model.layers} == {torch.nn.Linear}  # the router stays float
    reference = tiny_moe("list_w123")
    with torch.no_grad():
        for name, (_, r) in seen.items():
            reference.get_submodule(name).weight.copy_(r.weight)
        ids = torch.randint(0, 96, (3, 20), generator=torch.Generator().manual_seed(5))
        ours, ref = model(ids).logits, reference(ids).logits
    assert ((ours - ref).norm() / ref.norm()) < 2e-3


def test_same_hessians_as_the_fused_model_and_its_reader_loads_the_checkpoint(tmp_path):
    """The list holds the fused Qwen3-MoE model's weights (the same logits): layer 0's gate/up Hessians and codes are
    the fused run's bit for bit; the checkpoint (``experts.{e}.gate_proj`` ...) loads as the fused model."""
    listed, seen_l = run("list", act_order=True, keep_float=())
    fused, seen_f = run("qwen3_moe", act_order=True, keep_float=())
    for e in range(4):
        for p in ("gate_proj", "up_proj"):
            (Hl, rl), (Hf, rf) = seen_l[f"{EXPERTS}.{e}.{p}"], seen_f[f"{EXPERTS}.{e}.{p}"]
            assert torch.equal(Hl, Hf) and torch.equal(rl.codes, rf.codes)
    assert listed.quantize_stats.experts == fused.quantize_stats.experts
    out = mk.save_quantized(listed, tmp_path / "ck")
    loaded = mk.load_quantized(out, dtype=torch.float32)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        a, b = loaded(ids).logits, listed(ids).logits
    assert (a - b).norm() / b.norm() < 1e-5


def test_an_expert_no_token_reaches_is_solved_on_every_token():
    model, logged = tiny_moe("list"), []
    for layer in model.model.layers:  # the router's row for expert 3 very negative
        layer.mlp.gate.weight.data[3] = 0
        layer.mlp.gate.register_forward_hook(lambda m, a, out: out - 1e4 * (torch.arange(4) == 3))
    seen = {}
    quantize_model(model, random_sequences(SEQS, seed=1), callback=lambda n, H, r: seen.__setitem__(n, (H, r)),
                   **dict(KW, log=logged.append))
    for i in range(2):
        stats = model.quantize_stats.experts[f"model.layers.{i}.mlp.experts"]
        assert stats["tokens"][3] == 0 and stats["policy"][3] == "all tokens" and min(stats["tokens"][:3]) > 0
        assert f"model.layers.{i}.mlp.experts: experts [3] got no routed token: solved on every token" in logged
    assert all(torch.isfinite(H).all() and torch.isfinite(r.weight).all() for H, r in seen.values())


class NormedExpert(ListExpert):
    def forward(self, x):
        return super().forward(torch.nn.functional.normalize(x, dim=-1))


def test_lists_the_pipeline_cannot_read_are_refused_before_any_work():
    seqs, calls = random_sequences(SEQS, seed=1), []
    model = tiny_moe("list")
    experts = model.model.layers[1].mlp.experts
    for e in range(4):  # a norm inside each expert: its Linears do not see its tokens as they are
        normed = NormedExpert(64, 64, NAMES["list"], experts[e].act)
        normed.load_state_dict(experts[e].state_dict())
        experts[e] = normed
    model.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(UnsupportedExpertsError, match=r"model.layers.1.mlp.experts \(ModuleList\): each expert's "
                                                      r"Linears \['down_proj', 'gate_proj', 'up_proj'\] are not"):
        quantize_model(model, seqs, **KW)
    assert not calls
    quantize_model(model, seqs, **dict(KW, keep_float=("model.layers.1.mlp.experts",)))  # knowingly kept
    assert isinstance(model.model.layers[1].mlp.experts[0].gate_proj, torch.nn.Linear)
    assert isinstance(model.model.layers[0].mlp.experts[0].gate_proj, QuantLinear)

    model, calls = tiny_moe("list"), []
    block = model.model.layers[0].mlp  # a block that scales the tokens before handing them out
    block.forward = (lambda f: lambda h: f(h * 1.5))(block.forward)
    model.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(UnsupportedExpertsError, match="expert 0 is not called with rows of its block's input"):
        quantize_model(model, seqs, **KW)
    assert not calls


def test_rows_are_found_bit_for_bit_and_equal_rows_in_order():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 24, generator=g)
    x[[7, 31, 44]] = x[3].clone()  # four equal rows
    pos = torch.tensor([44, 5, 3, 31, 12, 7, 49])
    assert torch.equal(rows_of(x, x[pos]), torch.tensor([3, 5, 7, 31, 12, 44, 49]))  # equal rows: ascending
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert torch.equal(rows_of(x.to(dtype), x.to(dtype)[pos[1:2]]), pos[1:2])
    assert rows_of(x, x[pos] * 1.0001) is None
    assert rows_of(x, x[[3, 3, 3, 3, 3]]) is None  # more copies than x holds
    assert rows_of(x, x[:0]).numel() == 0


@pytest.mark.parametrize("family", ["list", "qwen3_moe"])
def test_keep_float_on_part_of_the_experts_is_refused(family):
    """Experts are quantized or kept whole: a pattern that names some of their matrices is an error naming them,
    before any work (a fused module cannot hold float and packed experts side by side)."""
    seqs = random_sequences(SEQS, seed=1)
    for pattern in ("down_proj", "mlp.experts.0"):
        with pytest.raises(UnsupportedExpertsError, match=r"keep_float \[.*\] names \d+ of the 12 expert matrices of "
                                                          r"model.layers.0.mlp.experts"):
            quantize_model(tiny_moe(family), seqs, **KW, keep_float=(pattern,))
