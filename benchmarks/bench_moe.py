"""One mixture-of-experts decoder layer shaped like Qwen3-30B-A3B (hidden 2048, 128 experts of width 768, 8 active
per token, 32 query / 4 KV heads of 128): ``quantize_model`` GPTQ 4-bit g128 with MaCa calibration of random tokens,
time per layer split into forward passes, Hessians (the experts' routed sums included) and solves, and the solves of
the experts on their own (384 of them: gate, up and down of 128 experts).

    python -m benchmarks.bench_moe [--cpu] [--gpu] [--experts 128] [--tokens 4096]
    python -m benchmarks.bench_moe --factor     # 16 experts' gate and up: one factorisation each or one per weight
    python -m benchmarks.bench_moe --batched    # 16 experts' solves: gptq_quantize_batched vs one by one
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import run_benchmark
from maca_kernels import quantize_model

COLUMNS = ["device", "experts", "tokens", "wall_s", "forward_s", "hessian_s", "reduce_s", "solve_s", "experts_solve_s",
           "attn_solve_s", "pack_s", "min_tokens", "peak_mb"]
QWEN3_30B_A3B = dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_attention_heads=32,
                     num_key_value_heads=4, head_dim=128, num_experts_per_tok=8, vocab_size=1024)


TINY_MOE = dict(hidden_size=128, moe_intermediate_size=64, intermediate_size=256, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, num_experts_per_tok=2, vocab_size=256)


def one_layer(experts: int, tokens: int, device: str, dtype=torch.float32, shape: dict = QWEN3_30B_A3B) -> dict:
    import transformers as tf

    config = tf.Qwen3MoeConfig(**shape, num_experts=experts, num_hidden_layers=1,
                               max_position_embeddings=4096)
    torch.manual_seed(0)
    model = tf.Qwen3MoeForCausalLM(config).to(dtype).eval()
    with torch.no_grad():  # the default init is tiny: weights of a trained model's scale
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(1)
    share = {128: 1 / 2, 512: 1 / 4, 1024: 1 / 8, 2048: 1 / 8}  # of the tokens, a MaCa mix
    mix = [n for n, f in share.items() for _ in range(max(1, round(tokens * f / n)))]
    seqs = [torch.randint(0, config.vocab_size, (n,), generator=g) for n in mix]
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    quantize_model(model, seqs, 4, min(128, shape["moe_intermediate_size"]), device=device, progress=False, log=None)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    st = model.quantize_stats
    solve = {k: v["seconds"] for k, v in st.modules.items()}
    tok = st.experts["model.layers.0.mlp.experts"]["tokens"]
    kind = "Qwen3-30B-A3B shape" if shape == QWEN3_30B_A3B else "tiny Qwen3-MoE"
    return dict(device=torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
                model=f"{kind}, {experts} experts, 1 layer, {str(dtype).removeprefix('torch.')}", method="gptq",
                activations_on=st.activations_on, per_layer_s=wall, memory_mb=dict(st.memory_mb),
                experts=experts, tokens=sum(s.numel() for s in seqs), wall_s=wall, forward_s=st.forward_s,
                hessian_s=st.hessian_s, reduce_s=st.reduce_s, solve_s=st.solve_s, pack_s=st.pack_s,
                experts_solve_s=sum(v for k, v in solve.items() if ".experts." in k),
                attn_solve_s=sum(v for k, v in solve.items() if ".self_attn." in k),
                min_tokens=min(tok), peak_mb=st.peak_memory_mb)


def shared_factor(experts: int = 16, d: int = 2048, inter: int = 768) -> dict:
    """Gate and up of ``experts`` experts (random correlated Hessians): each solve factorising H itself, against one
    ``gptq_factor`` per expert shared by both (the pipeline's way). The same codes either way (checked)."""
    import sys

    sys.path.insert(0, "tests/ops/gptq")
    from gptq_helpers import correlated_problem

    from maca_kernels import gptq_factor, gptq_quantize

    problems = [correlated_problem(2 * inter, d, seed=e, tokens=2 * d)[:2] for e in range(experts)]
    t0 = time.perf_counter()
    alone = [[gptq_quantize(w, H, 4, 128) for w in (W[:inter], W[inter:])] for W, H in problems]
    t1 = time.perf_counter()
    shared = []
    for W, H in problems:
        f = gptq_factor(H)
        shared.append([gptq_quantize(w, H, 4, 128, factor=f) for w in (W[:inter], W[inter:])])
    t2 = time.perf_counter()
    same = all(torch.equal(a.codes, b.codes)
               for pa, pb in zip(alone, shared, strict=True) for a, b in zip(pa, pb, strict=True))
    return dict(experts=experts, shape=f"{inter}x{d}", separate_s=t1 - t0, shared_s=t2 - t1,
                ratio=(t2 - t1) / (t1 - t0), same_codes=same)


def batched_vs_looped(experts: int = 16, d: int = 2048, inter: int = 768, device: str = "cuda") -> dict:
    """``experts`` gate projections (``inter`` × ``d``, 4-bit g128, act-order), each with its own Hessian: one
    ``gptq_quantize`` after another, against one ``gptq_quantize_batched`` (on a GPU: one sweep launch per column
    block for all). Both after a warm-up; the codes must agree bit for bit."""
    from maca_kernels import gptq_quantize, gptq_quantize_batched

    def sync(dev):
        if dev == "cuda":
            torch.cuda.synchronize()

    g = torch.Generator().manual_seed(0)
    Ws, Hs = [], []
    for _ in range(experts):
        X = torch.randn(2 * d, d, generator=g) * torch.exp(torch.randn(d, generator=g) * 0.5)
        Hs.append((X.T @ X / (2 * d)).to(device))
        Ws.append((torch.randn(inter, d, generator=g) * 0.02).to(device))
    kw = dict(bits=4, group_size=min(128, d), act_order=True)
    gptq_quantize(Ws[0], Hs[0], **kw), gptq_quantize_batched(Ws[:2], Hs[:2], **kw)  # compile / warm up
    sync(device)
    t0 = time.perf_counter()
    looped = [gptq_quantize(W, H, **kw) for W, H in zip(Ws, Hs, strict=True)]
    sync(device)
    t1 = time.perf_counter()
    batched = gptq_quantize_batched(Ws, Hs, **kw)
    sync(device)
    t2 = time.perf_counter()
    same = all(torch.equal(a.codes, b.codes) for a, b in zip(looped, batched, strict=True))
    return dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", experts=experts,
                shape=f"{inter}x{d}", group_size=kw["group_size"], looped_s=t1 - t0, batched_s=t2 - t1,
                ratio=(t2 - t1) / (t1 - t0), same_codes=same)


def main() -> None:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--factor", action="store_true", help="only gate/up solves with and without a shared factor")
    p.add_argument("--batched", action="store_true", help="only 16 experts' solves, batched vs one by one (a GPU)")
    a, _ = p.parse_known_args()
    if a.factor:
        print(shared_factor())
        return
    if a.batched:
        print(batched_vs_looped(device="cuda" if torch.cuda.is_available() else "cpu"))
        return
    run_benchmark("moe", __doc__, lambda: [one_layer(a.experts, a.tokens, "cpu")],
                  lambda: [one_layer(a.experts, max(a.tokens, 32768), "cuda", torch.bfloat16)], COLUMNS,
                  "seconds per part of one decoder layer; experts_solve_s / attn_solve_s: the solves of the experts' "
                  "and the attention's modules; min_tokens: the fewest routed to one expert; peak_mb: peak RSS on the "
                  "CPU, peak allocated on a GPU")


if __name__ == "__main__":
    main()
