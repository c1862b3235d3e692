"""save_quantized / load_quantized: round trip, sharding, atomic writes, validation, GPTQ interop."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import maca_kernels as mk  # noqa: E402
from maca_kernels import checkpoint as ckpt  # noqa: E402
from maca_kernels.formats.gptq import unpack_gptq_zeros  # noqa: E402

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SETTINGS = [(bits, sym, act) for bits in (2, 3, 4, 8) for sym in (True, False) for act in (False, True)]


def _id(s):
    bits, sym, act = s
    return f"b{bits}-{'sym' if sym else 'asym'}-{'act' if act else 'noact'}"


def tiny_llama(seed: int = 0, tie: bool = False, bias: bool = False):
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                                   num_attention_heads=4, num_key_value_heads=4, vocab_size=128,
                                   max_position_embeddings=64, tie_word_embeddings=tie, attention_bias=bias)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).float().eval()


def quantize_tiny(bits=4, sym=False, act_order=False, group_size=32, fmt="gptq", seed=0, tie=False, bias=False,
                  positive_group=False):
    """A tiny Llama whose decoder linears are GPTQ-quantized QuantLinear modules (H = XᵀX of random X)."""
    model = tiny_llama(seed, tie=tie, bias=bias)
    g = torch.Generator().manual_seed(seed + 1)
    for li, layer in enumerate(model.model.layers):
        for parent in (layer.self_attn, layer.mlp):
            for lname in LINEARS:
                lin = getattr(parent, lname, None)
                if lin is None:
                    continue
                W = lin.weight.detach().float().clone()
                if positive_group and li == 0 and lname == "q_proj":
                    W[:, :group_size] = W[:, :group_size].abs() + 0.01  # a group of only positive weights
                X = torch.randn(256, W.shape[1], generator=g)
                H = X.T @ X
                q = mk.gptq_quantize(W, H, bits=bits, group_size=group_size, sym=sym, act_order=act_order)
                b = None if lin.bias is None else lin.bias.detach().to(torch.float16)
                setattr(parent, lname, mk.QuantLinear.from_gptq(q, bias=b, checkpoint_format=fmt))
    model.config.quantization_config = ckpt.quantization_config(bits, group_size, sym, act_order, fmt,
                                                                damp_percent=0.01)
    return model.eval()


def tokens(seed=0, batch=2, length=12):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits.float()


def assert_same_buffers(a, b):
    qa = {n: m for n, m in a.named_modules() if isinstance(m, mk.QuantLinear)}
    qb = {n: m for n, m in b.named_modules() if isinstance(m, mk.QuantLinear)}
    assert qa.keys() == qb.keys() and qa
    for n in qa:
        for k in ("qweight", "qzeros", "scales", "g_idx", "bias"):
            ta, tb = getattr(qa[n], k), getattr(qb[n], k)
            assert (ta is None) == (tb is None), (n, k)
            if ta is not None:
                assert ta.dtype == tb.dtype and torch.equal(ta, tb), (n, k)
        assert (qa[n].bits, qa[n].group_size, qa[n].checkpoint_format, qa[n].act_order) == \
            (qb[n].bits, qb[n].group_size, qb[n].checkpoint_format, qb[n].act_order)


def no_pickle(folder: Path):
    for p in folder.rglob("*"):
        assert p.suffix not in (".bin", ".pt", ".pth", ".pkl", ".ckpt"), p
        if p.is_file():
            assert not p.read_bytes()[:2] == b"\x80\x04", f"{p} looks like a pickle"


# ----------------------------------------------------------------------------------------------


def test_quantization_config_fields():
    c = ckpt.quantization_config(4, 128, sym=False, desc_act=True, checkpoint_format="gptq_v2",
                                 meta={"quantizer": "me:1.0", "calibration": "maca"})
    assert c["quant_method"] == "gptq" and c["bits"] == 4 and c["group_size"] == 128
    assert c["desc_act"] is True and c["sym"] is False
    assert c["checkpoint_format"] == c["format"] == "gptq_v2" and c["pack_dtype"] == "int32"
    assert c["lm_head"] is False and c["true_sequential"] is True
    assert c["meta"]["quantizer"][0].startswith("maca_kernels:") and "me:1.0" in c["meta"]["quantizer"]
    assert c["meta"]["calibration"] == "maca"
    json.dumps(c)
    # transformers' own GPTQConfig accepts it
    tc = transformers.GPTQConfig.from_dict(dict(c))
    assert tc.bits == 4 and tc.format == "gptq_v2" and tc.desc_act and not tc.sym
    for bad in (dict(bits=5), dict(group_size=0), dict(checkpoint_format="awq")):
        kw = dict(bits=4, group_size=128, sym=True, desc_act=False) | bad
        with pytest.raises(ValueError):
            ckpt.quantization_config(**kw)


@pytest.mark.parametrize("setting", SETTINGS, ids=_id)
def test_round_trip(tmp_path, setting):
    bits, sym, act = setting
    model = quantize_tiny(bits, sym, act)
    ids = tokens()
    want = logits(model, ids)
    out = ckpt.save_quantized(model, tmp_path / "ck")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "maca_kernels_files.json",
                                                   "model.safetensors"]
    no_pickle(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == model.config.quantization_config
    loaded = ckpt.load_quantized(out, dtype=torch.float32)
    assert not loaded.training
    assert_same_buffers(model, loaded)
    assert torch.equal(logits(loaded, ids), want)
    # fp16 load: only the non-quantized tensors round to fp16
    l16 = ckpt.load_quantized(out)
    assert l16.model.embed_tokens.weight.dtype == torch.float16
    assert_same_buffers(model, l16)
    got = logits(l16, ids)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= 0.05 * want.abs().max() + 0.05


def test_gptq_v2_bias_and_tied_embeddings(tmp_path):
    model = quantize_tiny(4, False, True, fmt="gptq_v2", tie=True, bias=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = tokens(1)
    want = logits(model, ids)
    ckpt.save_quantized(model, tmp_path / "ck")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ck" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert "model.layers.0.self_attn.q_proj.bias" in keys
    loaded = ckpt.load_quantized(tmp_path / "ck", dtype=torch.float32)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.model.layers[0].self_attn.q_proj.checkpoint_format == "gptq_v2"
    assert_same_buffers(model, loaded)
    assert torch.equal(logits(loaded, ids), want)


def test_positive_group_never_stores_zero_zero(tmp_path):
    """v1 hazard: a group of only positive weights would want zero 0 (all-ones field in v1)."""
    for bits in (2, 3, 4, 8):
        model = quantize_tiny(bits, sym=False, positive_group=True)
        layer = model.model.layers[0].self_attn.q_proj
        out = ckpt.save_quantized(model, tmp_path / f"ck{bits}")
        loaded = ckpt.load_quantized(out, dtype=torch.float32)
        lq = loaded.model.layers[0].self_attn.q_proj
        zeros = unpack_gptq_zeros(lq.qzeros, bits, lq.out_features, "gptq")  # true zeros [N, G]
        # min/max would put the zero of the all-positive group at 0; the quantizer stores 1 instead
        assert bool((zeros[:, 0] == 1).all())
        assert int(zeros.min()) >= 1 and int(zeros.max()) <= (1 << bits) - 1
        # so the stored v1 field (zero − 1) is never all-ones: no carry for word-level readers
        raw = unpack_gptq_zeros(lq.qzeros, bits, lq.out_features, "gptq_v2")
        assert int(raw.max()) <= (1 << bits) - 2
        assert torch.equal(lq.qzeros, layer.qzeros)


def test_sharding(tmp_path):
    model = quantize_tiny(3, True, False)
    ids = tokens(2)
    want = logits(model, ids)
    out = ckpt.save_quantized(model, tmp_path / "ck", max_shard_size="20KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3 and not (out / "model.safetensors").exists()
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / ckpt.SAFE_WEIGHTS_INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in model.state_dict().values())
    no_pickle(out)
    loaded = ckpt.load_quantized(out, dtype=torch.float32)
    assert torch.equal(logits(loaded, ids), want)
    assert_same_buffers(model, loaded)
    # a shard that disappears is reported by name
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=shards[1].name):
        ckpt.load_quantized(out)


def test_atomic_write(tmp_path, monkeypatch):
    old = quantize_tiny(4, True, False, seed=0)
    new = quantize_tiny(2, False, True, seed=1)
    out = ckpt.save_quantized(old, tmp_path / "ck")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    calls = {"n": 0}
    real = ckpt._ShardWriter.add

    def failing(self, name, t):
        calls["n"] += 1
        if calls["n"] == 40:  # inside the second shard
            raise OSError("disk full (simulated)")
        return real(self, name, t)

    monkeypatch.setattr(ckpt._ShardWriter, "add", failing)
    with pytest.raises(OSError, match="simulated"):
        ckpt.save_quantized(new, out, max_shard_size="30KB", overwrite=True)
    assert calls["n"] == 40
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old folder intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp folder left

    # an interruption (KeyboardInterrupt) while writing the tokenizer/config: same
    monkeypatch.setattr(ckpt._ShardWriter, "add", real)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(new.generation_config), "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_quantized(new, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    monkeypatch.undo()

    # a successful save replaces the folder, again leaving nothing beside it
    ckpt.save_quantized(new, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 2
    ids = tokens(3)
    assert torch.equal(logits(ckpt.load_quantized(out, dtype=torch.float32), ids), logits(new, ids))


def test_atomic_replace_without_renameat2(tmp_path, monkeypatch):
    """Where the atomic exchange is unavailable, the old folder is renamed aside, then deleted."""
    monkeypatch.setattr(ckpt, "_exchange", lambda a, b: False)
    a, b = quantize_tiny(4, True, False, seed=0), quantize_tiny(8, False, False, seed=1)
    out = ckpt.save_quantized(a, tmp_path / "ck")
    ckpt.save_quantized(b, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    ids = tokens(5)
    assert torch.equal(logits(ckpt.load_quantized(out, dtype=torch.float32), ids), logits(b, ids))


def _rewrite(folder: Path, edit):
    from safetensors.torch import load_file, save_file

    f = folder / "model.safetensors"
    t = load_file(str(f))
    edit(t)
    save_file(t, str(f), metadata={"format": "pt"})


def test_validation_errors(tmp_path):
    model = quantize_tiny(4, False, False)
    base = ckpt.save_quantized(model, tmp_path / "base")
    name = "model.layers.1.mlp.down_proj"

    def case(tag, edit, match):
        d = tmp_path / tag
        shutil.copytree(base, d)
        _rewrite(d, edit)
        with pytest.raises(ValueError, match=match):
            ckpt.load_quantized(d)

    case("shape", lambda t: t.__setitem__(f"{name}.qweight", t[f"{name}.qweight"][:-1].clone()),
         rf"{name}\.qweight.*shape")
    case("zshape", lambda t: t.__setitem__(f"{name}.qzeros", torch.zeros(3, 16, dtype=torch.int32)),
         rf"{name}\.qzeros.*shape")
    case("sdtype", lambda t: t.__setitem__(f"{name}.scales", t[f"{name}.scales"].float()),
         rf"{name}\.scales.*dtype")
    case("gdtype", lambda t: t.__setitem__(f"{name}.g_idx", t[f"{name}.g_idx"].long()), rf"{name}\.g_idx.*dtype")
    case("missing", lambda t: t.pop(f"{name}.scales"), rf"missing.*{name}\.scales")
    case("missing_fp", lambda t: t.pop("model.norm.weight"), r"missing.*model\.norm\.weight")
    case("unexpected", lambda t: t.__setitem__("model.extra.weight", torch.zeros(2)), r"unexpected.*model\.extra")
    case("fpshape", lambda t: t.__setitem__("model.norm.weight", torch.zeros(63)), r"model\.norm\.weight.*shape")
    case("gidx_range", lambda t: t.__setitem__(f"{name}.g_idx", torch.full((128,), 9, dtype=torch.int32)),
         r"g_idx must lie")

    # config/weights disagreement: bits in config.json changed → every qweight has the wrong shape
    d = tmp_path / "cfgbits"
    shutil.copytree(base, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 8
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"qweight.*shape"):
        ckpt.load_quantized(d)

    # a corrupt file is reported by name; a pickle-only folder is refused
    d = tmp_path / "corrupt"
    shutil.copytree(base, d)
    (d / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="model.safetensors"):
        ckpt.load_quantized(d)
    (d / "model.safetensors").unlink()
    torch.save({}, d / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle"):
        ckpt.load_quantized(d)


def test_save_refuses_inconsistent_models(tmp_path):
    model = quantize_tiny(4, False, True)
    model.config.quantization_config = ckpt.quantization_config(4, 32, False, desc_act=False)
    with pytest.raises(ValueError, match="desc_act"):
        ckpt.save_quantized(model, tmp_path / "a")
    model.config.quantization_config = ckpt.quantization_config(3, 32, False, desc_act=True)
    with pytest.raises(ValueError, match="bits=4"):
        ckpt.save_quantized(model, tmp_path / "b")
    with pytest.raises(ValueError, match="no QuantLinear"):
        plain = tiny_llama()
        plain.config.quantization_config = ckpt.quantization_config(4, 32, False, False)
        ckpt.save_quantized(plain, tmp_path / "c")
    del model.config.quantization_config
    with pytest.raises(ValueError, match="quantization_config"):
        ckpt.save_quantized(model, tmp_path / "d")
    assert not any(tmp_path.iterdir())


def test_from_checkpoint():
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(5))
    X = torch.randn(300, 128, generator=torch.Generator().manual_seed(6))
    q = mk.gptq_quantize(W, X.T @ X, bits=3, group_size=32, act_order=True)
    ref = mk.QuantLinear.from_gptq(q)
    t = q.to_gptq()
    bias = torch.randn(64).half()
    layer = mk.QuantLinear.from_checkpoint(t, 3, 32, bias=bias)
    assert (layer.in_features, layer.out_features, layer.act_order) == (128, 64, True)
    x = torch.randn(5, 128)
    assert torch.equal(layer(x), ref(x) + bias.float())
    with pytest.raises(ValueError, match="scales"):
        mk.QuantLinear.from_checkpoint(dict(t, scales=t["scales"][:2]), 3, 32)
    with pytest.raises(ValueError, match="qzeros"):
        mk.QuantLinear.from_checkpoint(dict(t, qzeros=t["qzeros"].long()), 3, 32)
    with pytest.raises(ValueError, match="missing.*qweight"):
        mk.QuantLinear.from_checkpoint({k: v for k, v in t.items() if k != "qweight"}, 3, 32)


def test_tokenizer_saved(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(127)} | {"<unk>": 127}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    model = quantize_tiny(4, True, False)
    out = ckpt.save_quantized(model, tmp_path / "ck", tokenizer=hf_tok)
    assert (out / "tokenizer.json").exists()
    no_pickle(out)
    again = transformers.AutoTokenizer.from_pretrained(str(out))
    assert again("t1 t5 t9")["input_ids"] == hf_tok("t1 t5 t9")["input_ids"]


# ----------------------------------------------------------------------------------------------
# interop: an independent GPTQ reader (transformers + optimum + gptqmodel) loads our checkpoints


def _interop_check(model, out: Path, tag: str):
    """Load ``out`` with transformers (+ optimum + gptqmodel) and compare with ours: every quantized
    module's dequantized weight bit-identical (after ours is rounded to the fp16 they compute in),
    logits within fp16 rounding."""
    from maca_kernels.formats.gptq import dequantize_gptq

    ids = tokens(4)
    ours_model = ckpt.load_quantized(out, dtype=torch.float16)
    ours = logits(ours_model, ids)
    theirs_model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float16, device_map="cpu")
    theirs = logits(theirs_model, ids)
    kernels, wdiff = set(), 0.0
    for name, m in ours_model.named_modules():
        if not isinstance(m, mk.QuantLinear):
            continue
        t = theirs_model.get_submodule(name)
        kernels.add(type(t).__name__)
        c = m.checkpoint_tensors()  # act-order layers keep qweight in the kernels' row order internally
        w_ours = dequantize_gptq(c["qweight"], c["scales"], c["qzeros"], c["g_idx"], m.bits, m.checkpoint_format)
        w_theirs = t.dequantize_weight().t().float()  # [K, N] → [N, K]
        wdiff = max(wdiff, (w_theirs - w_ours.half().float()).abs().max().item())
    diff = (ours - theirs).abs().max().item()
    scale = max(ours.abs().max().item(), 1.0)
    if os.environ.get("MK_INTEROP_LOG"):  # numbers for the report
        with open(os.environ["MK_INTEROP_LOG"], "a") as f:
            f.write(json.dumps({"setting": tag, "max_abs_logit_diff": diff, "max_abs_logit": ours.abs().max().item(),
                                "max_dequant_diff": wdiff, "their_kernels": sorted(kernels)}) + "\n")
    assert wdiff == 0.0, f"dequantized weights differ by up to {wdiff}"
    assert diff <= 4e-3 * scale, diff  # a few fp16 ulps of the logits


@pytest.mark.parametrize("setting", SETTINGS, ids=_id)
def test_interop_transformers_gptqmodel(tmp_path, setting):
    pytest.importorskip("optimum")
    pytest.importorskip("gptqmodel")
    bits, sym, act = setting
    model = quantize_tiny(bits, sym, act, positive_group=True)
    _interop_check(model, ckpt.save_quantized(model, tmp_path / "ck"), _id(setting))


@pytest.mark.parametrize("bits", [3, 4])
def test_interop_v2_tied_bias_sharded(tmp_path, bits):
    pytest.importorskip("optimum")
    pytest.importorskip("gptqmodel")
    model = quantize_tiny(bits, False, True, fmt="gptq_v2", tie=True, bias=True)
    out = ckpt.save_quantized(model, tmp_path / "ck", max_shard_size="40KB")
    assert (out / ckpt.SAFE_WEIGHTS_INDEX_NAME).exists()
    _interop_check(model, out, f"b{bits}-asym-act-gptq_v2-tied-bias-sharded")


def test_interop_gptqmodel_loads_moe_experts(tmp_path):
    """GPTQModel.load (7.7) reads our per-expert MoE checkpoint (Qwen3-MoE, sym) into its own per-expert modules
    with our logits. transformers + optimum do not: they load the model with the per-expert tensors left unused
    and the fused experts uninitialised (the README says so), so this goes through GPTQModel itself."""
    pytest.importorskip("gptqmodel")
    import sys

    from gptqmodel import GPTQModel

    sys.path.insert(0, str(Path(__file__).parent / "pipeline"))
    from tiny_models import random_sequences, tiny_moe

    model = tiny_moe("qwen3_moe")
    mk.quantize_model(model, random_sequences([16, 32, 32, 24], seed=1), 4, 32, sym=True, progress=False, log=None)
    out = ckpt.save_quantized(model, tmp_path / "ck")
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = logits(ckpt.load_quantized(out, dtype=torch.float16), ids)
    theirs_model = GPTQModel.load(str(out), device="cpu", dtype=torch.float16)
    experts = theirs_model.model.model.layers[0].mlp.experts
    assert len(experts) == 4 and all(hasattr(experts[e], p) for e in range(4) for p in ("gate_proj", "down_proj"))
    theirs = logits(theirs_model.model, ids)
    assert (ours - theirs).abs().max().item() <= 4e-3 * max(ours.abs().max().item(), 1.0)


def test_round_trip_with_the_cuda_gemv_on(tmp_path):
    """A model whose layers keep only the CUDA GEMV's layout (mk.enable_cuda_gemv) saves the same checkpoint
    bit for bit, and loads back into it."""
    model = quantize_tiny(4, act_order=True, group_size=32)
    first = ckpt.save_quantized(model, tmp_path / "before")
    switched = mk.enable_cuda_gemv(model)
    assert switched and all(model.get_submodule(n).qweight.numel() == 0 for n in switched)
    second = ckpt.save_quantized(model, tmp_path / "after")
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    loaded = ckpt.load_quantized(second, dtype=torch.float32)
    assert set(mk.enable_cuda_gemv(loaded)) == set(switched)
    loaded.load_state_dict(model.state_dict())  # into layers that hold only the layout
    mk.enable_cuda_gemv(loaded, False)
    assert_same_buffers(quantize_tiny(4, act_order=True, group_size=32), loaded)
