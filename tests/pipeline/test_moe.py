"""Mixture-of-experts models with fused experts (transformers 5 Mixtral and Qwen3-MoE): every expert quantized
from the tokens routed to it, with the run's weighting, against float64 sums by hand; the policy for experts few
or no tokens reach; the quantized forward against the dequantized weights; save → load → the same logits."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import random_sequences, tiny_moe  # noqa: E402

import maca_kernels as mk  # noqa: E402
from maca_kernels.nn import QuantLinear  # noqa: E402
from maca_kernels.nn.experts import Experts  # noqa: E402
from maca_kernels.pipeline import quantize_model  # noqa: E402
from maca_kernels.pipeline.experts import UnsupportedExpertsError  # noqa: E402

KW = dict(bits=4, group_size=32, progress=False, log=None)
SEQS = [16, 32, 32, 24]  # the two 32s run as one batch: token t of it belongs to sequence t // 32
EXPERTS = "model.layers.0.mlp.experts"


def run(family: str, **kw):
    """Quantize with attention kept in float (layer 0's experts then see the float model's tokens); returns the
    model, the Hessian and result each module was solved with, and the calibration sequences."""
    model, seen = tiny_moe(family), {}
    seqs = random_sequences(SEQS, seed=1)
    quantize_model(model, seqs, callback=lambda n, H, r: seen.__setitem__(n, (H, r)),
                   keep_float=kw.pop("keep_float", ("self_attn",)), **KW, **kw)
    return model, seen, seqs


def routed(family: str, seqs):
    """Per sequence: the float64 tokens [L, d] layer 0's experts get and the experts each is routed to [L, k]."""
    model, got = tiny_moe(family), []
    ex = model.model.layers[0].mlp.experts
    h = ex.register_forward_pre_hook(lambda m, a: got.append((a[0].double(), a[1])))
    with torch.no_grad():
        for s in seqs:
            model(s[None])
    h.remove()
    return got, model


def hand(xs, weighting: str) -> torch.Tensor:
    """2/N · Σ over samples: each sequence (1/n_s · Σ_t x xᵀ; N = sequences) or each token (N = tokens)."""
    d = xs[0].shape[1]
    total = torch.zeros(d, d, dtype=torch.float64)
    for x in xs:
        total += x.T @ x / (x.shape[0] if weighting == "sequence" else 1)
    n = len(xs) if weighting == "sequence" else sum(x.shape[0] for x in xs)
    return 2 * total / n


def close(a, b, tol=2e-5):
    return (a.double() - b).norm() / b.norm() < tol


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("weighting", ["sequence", "token"])
def test_each_experts_hessians_are_its_routed_tokens(family, weighting):
    model, seen, seqs = run(family, weighting=weighting, moe_min_tokens=0)
    per_seq, fmodel = routed(family, seqs)
    stats = model.quantize_stats.experts[EXPERTS]
    act = fmodel.model.layers[0].mlp.experts.act_fn
    for e in range(4):
        mine = [x[(idx == e).any(-1)] for x, idx in per_seq]
        mine = [x for x in mine if len(x)]
        assert stats["tokens"][e] == sum(len(x) for x in mine) and stats["sequences"][e] == len(mine)
        assert stats["policy"][e] == "routed"
        H_gate, _ = seen[f"{EXPERTS}.{e}.gate_proj"]
        assert close(H_gate, hand(mine, weighting))
        assert torch.equal(H_gate, seen[f"{EXPERTS}.{e}.up_proj"][0])  # gate and up share it
        # down sees the expert's own quantized act(gate)·up of the same tokens
        Wg, Wu = (seen[f"{EXPERTS}.{e}.{p}"][1].weight.double() for p in ("gate_proj", "up_proj"))
        inner = [act(F.linear(x, Wg)) * F.linear(x, Wu) for x in mine]
        assert close(seen[f"{EXPERTS}.{e}.down_proj"][0], hand(inner, weighting))


def test_experts_with_few_tokens_are_blended_with_every_tokens_hessian():
    m = 10**6
    model, seen, seqs = run("qwen3_moe", moe_min_tokens=m)
    per_seq, _ = routed("qwen3_moe", seqs)
    H_all = hand([x for x, _ in per_seq], "sequence")
    stats = model.quantize_stats.experts[EXPERTS]
    assert stats["policy"] == ["blended"] * 4
    for e in range(4):
        mine = [x[(idx == e).any(-1)] for x, idx in per_seq]
        w = stats["tokens"][e] / m
        want = w * hand([x for x in mine if len(x)], "sequence") + (1 - w) * H_all
        assert close(seen[f"{EXPERTS}.{e}.gate_proj"][0], want)
    meta = model.config.quantization_config["meta"]["experts"]
    assert meta["calibration"] == "routed" and meta["min_tokens"] == m and meta["modules"][EXPERTS] == stats


def test_all_tokens_policy_gives_every_expert_every_token():
    model, seen, seqs = run("mixtral", moe_calibration="all")
    per_seq, fmodel = routed("mixtral", seqs)
    H_all = hand([x for x, _ in per_seq], "sequence")
    assert model.quantize_stats.experts[EXPERTS]["policy"] == ["all tokens"] * 4
    act = fmodel.model.layers[0].mlp.experts.act_fn
    for e in range(4):
        assert close(seen[f"{EXPERTS}.{e}.gate_proj"][0], H_all)
        Wg, Wu = (seen[f"{EXPERTS}.{e}.{p}"][1].weight.double() for p in ("gate_proj", "up_proj"))
        inner = [act(F.linear(x, Wg)) * F.linear(x, Wu) for x, _ in per_seq]
        assert close(seen[f"{EXPERTS}.{e}.down_proj"][0], hand(inner, "sequence"))


def _never_route_to(model, expert: int):
    """The router's choices rewritten so that no token goes to ``expert`` (its slot given to the lowest free one)."""
    def hook(module, args, out):
        logits, scores, idx = out
        idx = idx.clone()
        for row in idx:
            for j in range(len(row)):
                if row[j] == expert:
                    row[j] = min(set(range(module.num_experts)) - set(row.tolist()) - {expert})
        return logits, scores, idx

    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(hook)


def test_an_expert_no_token_reaches_is_solved_on_every_token_and_reported():
    model, seen, logged = tiny_moe("qwen3_moe"), {}, []
    _never_route_to(model, 3)
    quantize_model(model, random_sequences(SEQS, seed=1), callback=lambda n, H, r: seen.__setitem__(n, (H, r)),
                   keep_float=("self_attn",), **dict(KW, log=logged.append))
    for i in range(2):
        stats = model.quantize_stats.experts[f"model.layers.{i}.mlp.experts"]
        assert stats["tokens"][3] == 0 and stats["sequences"][3] == 0 and stats["policy"][3] == "all tokens"
        assert all(n > 0 for n in stats["tokens"][:3])
        assert f"model.layers.{i}.mlp.experts: experts [3] got no routed token: solved on every token" in logged
    assert all(torch.isfinite(H).all() and torch.isfinite(r.weight).all() for H, r in seen.values())
    per_seq, _ = routed("qwen3_moe", random_sequences(SEQS, seed=1))
    assert close(seen[f"{EXPERTS}.3.gate_proj"][0], hand([x for x, _ in per_seq], "sequence"))


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("method", ["gptq", "gptaq", "rtn"])
def test_every_expert_quantized_and_the_forward_matches_the_dequantized_weights(family, method):
    model, seen, _ = run(family, method=method, keep_float=(), act_order=method == "gptq")
    names = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert names == {f"model.layers.{i}.{p}" for i in range(2) for p in
                     [f"self_attn.{x}_proj" for x in "qkvo"] +
                     [f"mlp.experts.{e}.{x}_proj" for e in range(4) for x in ("gate", "up", "down")]}
    assert all(isinstance(layer.mlp.experts, Experts) for layer in model.model.layers)
    reference = tiny_moe(family)  # the float model with every quantized matrix replaced by its dequantized weight
    with torch.no_grad():
        for name, (_, r) in seen.items():
            head, _, proj = name.rpartition(".")
            if ".experts." in name:
                exp_name, _, e = head.rpartition(".")
                ex = reference.get_submodule(exp_name)
                inter = ex.down_proj.shape[2]
                rows = {"gate_proj": ex.gate_up_proj[int(e)][:inter], "up_proj": ex.gate_up_proj[int(e)][inter:],
                        "down_proj": ex.down_proj[int(e)]}[proj]
                rows.copy_(r.weight)
            else:
                reference.get_submodule(name).weight.copy_(r.weight)
        ids = torch.randint(0, 96, (3, 20), generator=torch.Generator().manual_seed(5))
        ours, ref = model(ids).logits, reference(ids).logits
    assert ((ours - ref).norm() / ref.norm()) < 2e-3  # fp16 scales in the packed modules


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_save_load_same_logits_per_expert_tensors(family, tmp_path):
    model, _, _ = run(family, act_order=True, keep_float=())
    out = mk.save_quantized(model, tmp_path / "ck")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {f"{EXPERTS}.2.{p}.{t}" for p in ("gate_proj", "up_proj", "down_proj")
            for t in ("qweight", "qzeros", "scales", "g_idx")} <= keys
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in keys)
    loaded = mk.load_quantized(out, dtype=torch.float32)
    assert isinstance(loaded.model.layers[1].mlp.experts, Experts)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.config.quantization_config["meta"]["experts"]["modules"] == model.quantize_stats.experts


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe", "deepseek_v3"])
def test_other_moe_families(family, tmp_path):
    """Shared experts beside the routed ones (their scalar gate kept in float), MLA attention, a dense first layer:
    every matrix of the decoder layers quantized or kept by the policy, and the checkpoint loads back."""
    model = tiny_moe(family)
    layers = model.model.layers
    float_matrices = {f"model.layers.{i}.{n}" for i, layer in enumerate(layers) for n, p in layer.named_parameters()
                      if p.dim() >= 2}
    quantize_model(model, random_sequences(SEQS, seed=1), **dict(KW, group_size=16))
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    routers = {n for n in float_matrices if n.endswith(("gate.weight", "shared_expert_gate.weight"))}
    fused = {n for n in float_matrices if n.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    linears = float_matrices - routers - fused
    assert {n + ".weight" for n in quantized if ".experts." not in n} == linears
    assert {n.rpartition(".")[0] for n in fused} == {n.rsplit(".", 2)[0] for n in quantized if ".experts." in n}
    assert len(model.quantize_stats.experts) == sum(isinstance(layer.mlp.experts, Experts) for layer in layers
                                                    if hasattr(layer.mlp, "experts"))
    out = mk.save_quantized(model, tmp_path / "ck")
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        assert torch.equal(mk.load_quantized(out, dtype=torch.float32)(ids).logits, model(ids).logits)


def test_bad_policy_arguments_and_a_forward_we_do_not_reproduce():
    seqs = random_sequences([16], seed=1)
    with pytest.raises(ValueError, match=r"moe_calibration must be one of \('routed', 'all'\), got 'some'"):
        quantize_model(tiny_moe("mixtral"), seqs, moe_calibration="some", **KW)
    with pytest.raises(ValueError, match="moe_min_tokens must be an int >= 0, got -1"):
        quantize_model(tiny_moe("mixtral"), seqs, moe_min_tokens=-1, **KW)
    model = tiny_moe("mixtral")
    ex = model.model.layers[0].mlp.experts
    plain = ex.forward
    ex.forward = lambda *a, **k: 2 * plain(*a, **k)  # e.g. a scale this pipeline does not know of
    with pytest.raises(UnsupportedExpertsError, match=r"mlp.experts \(MixtralExperts\): its forward is not"):
        quantize_model(model, seqs, **KW)


def test_resume_after_interruption_is_bit_identical(tmp_path):
    """Stopped in layer 1's experts and resumed: the same weights and the same routing counts in the meta."""
    full, _, _ = run("qwen3_moe", method="gptaq", keep_float=())

    class Boom(Exception):
        pass

    def stop(name, H, r):
        if name.startswith("model.layers.1.mlp.experts.2."):
            raise Boom

    kw = dict(method="gptaq", resume_dir=str(tmp_path), **KW)
    with pytest.raises(Boom):
        quantize_model(tiny_moe("qwen3_moe"), random_sequences(SEQS, seed=1), callback=stop, **kw)
    resumed = quantize_model(tiny_moe("qwen3_moe"), random_sequences(SEQS, seed=1), **kw)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.config.quantization_config == full.config.quantization_config  # routing counts of layer 0 too


def test_cli_options(tmp_path, capsys, monkeypatch):
    import json

    from tiny_models import ByteTokenizer

    from maca_kernels.cli import EXIT_USAGE, main

    tiny_moe("qwen3_moe").save_pretrained(tmp_path / "moe")
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: ByteTokenizer())
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog; " * 400)
    q = ["quantize", "--model", str(tmp_path / "moe"), "--group-size", "32", "--text", str(text), "--calib-tokens",
         "512", "--lengths", "32", "64"]
    assert main([*q, "--out", str(tmp_path / "a"), "--moe-min-tokens", "-1"]) == EXIT_USAGE
    assert "--moe-min-tokens must be an int >= 0, got -1" in capsys.readouterr().err
    assert main([*q, "--out", str(tmp_path / "b"), "--moe-calibration", "all", "--moe-min-tokens", "7"]) == 0
    moe = json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]["meta"]["experts"]
    assert moe["calibration"] == "all" and moe["min_tokens"] == 7
    assert moe["modules"]["model.layers.1.mlp.experts"]["policy"] == ["all tokens"] * 4


def test_chunks_of_experts_give_the_same_bits(monkeypatch):
    """Experts taken one per chunk (a budget too small for two Hessians) or all at once: the same checkpoint."""
    import maca_kernels.pipeline.expert_hessians as eh

    fused = eh.FusedExperts("", tiny_moe("mixtral").model.layers[0].mlp.experts)
    assert eh.chunks(fused, True) == [[0, 1, 2, 3]]
    whole, _, _ = run("mixtral", method="gptaq", keep_float=(), moe_min_tokens=40)
    monkeypatch.setattr(eh, "CHUNK_BYTES", 1)
    assert eh.chunks(fused, True) == [[0], [1], [2], [3]]
    one, _, _ = run("mixtral", method="gptaq", keep_float=(), moe_min_tokens=40)
    a, b = whole.state_dict(), one.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert one.quantize_stats.experts == whole.quantize_stats.experts


def test_a_folder_with_fused_experts_streams_disk_to_disk(tmp_path):
    """A checkpoint that stores the experts fused (as the model holds them) is read one layer at a time, and the
    output is the in-memory pipeline's, byte for byte."""
    from safetensors.torch import save_file
    from test_streaming import same_folders
    from transformers import AutoModelForCausalLM

    from maca_kernels.pipeline.streamed import unstreamable

    src = tmp_path / "src"
    model = tiny_moe("qwen3_moe")
    model.config.save_pretrained(src)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src / "model.safetensors"),
              metadata={"format": "pt"})
    assert unstreamable(src) is None
    calib = random_sequences(SEQS, seed=1)
    mk.quantize_folder(src, tmp_path / "streamed", calib, 4, 32, dtype=torch.float32, method="gptaq", progress=False,
                       log=None)
    whole = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    quantize_model(whole, calib, 4, 32, method="gptaq", progress=False, log=None)
    mk.save_quantized(whole, tmp_path / "memory")
    same_folders(tmp_path / "memory", tmp_path / "streamed")
