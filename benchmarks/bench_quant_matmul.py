"""quant_matmul: packed 2/3/4-bit GEMV/GEMM vs fp16 ``torch.matmul`` (GPU) and torch fp32 (CPU).

GPU: K×N ∈ {4096×4096, 4096×14336, 14336×4096, 8192×28672}, M ∈ {1, 16, 128, 2048}, bits 2/3/4, group
128: time vs fp16 ``x @ Wᵀ``, effective bandwidth (packed weight + fp16 scales + packed zeros over the
time) as a fraction of the measured device-to-device copy bandwidth; L2 flushed between runs
(do_bench), CUDA graphs up to M = 16 (launch cost); the opt-in CUDA tensor-core GEMV beside the default
kernels up to M = 16; act-order ``g_idx`` vs sorted groups at M = 1, int4 (the CUDA GEMV's too).
CPU: M = 1 and 16 at 4096×4096 vs torch fp32 ``F.linear`` on the dequantized weight, all cores; act-order
vs sorted at M = 1 for each bit width.

    python -m benchmarks.bench_quant_matmul [--cpu] [--gpu]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import maca_kernels as mk
from benchmarks.common import run_benchmark, time_cpu, time_cpu_paired, time_gpu
from maca_kernels.formats.gptq import pack_gptq, pack_gptq_zeros
from maca_kernels.ops.quant_matmul import cuda_kernel, mma_layout

COLUMNS = ["device", "K", "N", "M", "bits", "impl", "ms", "speedup", "GB/s", "bw_fraction", "vs_sorted", "rel_err"]
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]


def checkpoint(N: int, K: int, bits: int, group: int, device: str, seed: int = 0, act_order: bool = False):
    """Random codes/zeros/scales generated on ``device`` → (W fp32 [N, K], (qweight, scales, qzeros), g_idx).
    ``act_order``: a random permutation of the sorted group index (the same packed tensors otherwise)."""
    g = torch.Generator(device=device).manual_seed(seed)
    maxq = 2**bits - 1
    G = K // group
    codes = torch.randint(0, maxq + 1, (N, K), generator=g, device=device)
    zeros = torch.randint(1, maxq + 1, (N, G), generator=g, device=device)
    scales = (torch.rand(N, G, generator=g, device=device) * 0.01 + 0.001).half()
    gi = torch.arange(K, device=device) // group
    if act_order:
        gi = gi[torch.randperm(K, generator=g, device=device)]
    W = (codes - zeros[:, gi]).float() * scales.float()[:, gi]
    ck = (pack_gptq(codes, bits), scales.T.contiguous(), pack_gptq_zeros(zeros, bits))
    return W, ck, (gi.to(torch.int32) if act_order else None)


def packed_bytes(N: int, K: int, bits: int, group: int) -> int:
    return N * K * bits // 8 + (K // group) * N * 2 + (K // group) * N * bits // 8


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in GB/s (read + write), the practical ceiling."""
    a = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = time_gpu(lambda: b.copy_(a))
    return 2 * a.numel() / ms / 1e6


def _graphed(fn):
    """Capture fn in a CUDA graph (small batches are launch-bound otherwise); returns a replay function."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _measure(x, W, ck, bits, group, timer, base_weight, graphs=False, g_idx=None):
    qw, sc, qz = ck
    ours = lambda: mk.quant_matmul(x, qw, sc, qz, g_idx, bits, group)  # noqa: E731
    base = lambda: F.linear(x, base_weight)  # noqa: E731  (x @ Wᵀ in the weight's dtype)
    want = x.double() @ W.double().T
    err = ((ours().double() - want).norm() / want.norm()).item()
    if graphs:
        ours, base = _graphed(ours), _graphed(base)
    return timer(ours), timer(base), err


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else f"{device} ({torch.get_num_threads()} threads)"


MMA_IMPL = "maca_kernels CUDA mma GEMV"
MMA_TRITON_IMPL = "maca_kernels mma layout (Triton)"  # batches above 16 rows of a layer with the CUDA GEMV on


def gpu_case(K: int, N: int, bits: int, Ms=(1, 16, 128, 2048), group: int = 128, device: str = "cuda",
             timer=time_gpu, bw: float | None = None) -> list[dict]:
    """One weight shape and bit width against fp16 ``F.linear`` at each batch size (CUDA graphs up to M = 16,
    where a few-µs kernel would otherwise time the launch)."""
    rows = []
    dev = _device_name(device)
    dtype = torch.float16 if device == "cuda" else torch.float32  # off CUDA (dry runs): fp32 activations
    W, ck, _ = checkpoint(N, K, bits, group, device, seed=K + N + bits)
    mma = None  # the mma layout (opt-in backend="cuda": the CUDA GEMV up to 16 rows, Triton above), where it exists
    if device == "cuda" and cuda_kernel.available() and mma_layout.supports(bits, group, K, N):
        mma = mk.to_decode_weight(*ck, None, bits, group, mma=True)
    for M in Ms:
        x = torch.randn(M, K, device=device, dtype=dtype)
        t_ours, t_base, err = _measure(x, W, ck, bits, group, timer, W.to(dtype), graphs=M <= 16 and device == "cuda")
        gbs = packed_bytes(N, K, bits, group) / t_ours / 1e6
        common = dict(device=dev, K=K, N=N, M=M, bits=bits)
        rows.append(dict(common, impl="maca_kernels", ms=t_ours, speedup=t_base / t_ours, **{"GB/s": gbs},
                         bw_fraction=gbs / bw if bw else None, rel_err=err))
        rows.append(dict(common, impl="torch fp16 matmul", ms=t_base, speedup=1.0))
        if mma is not None:
            impl = MMA_IMPL if M <= cuda_kernel.MAX_M else MMA_TRITON_IMPL
            try:  # not yet run on a GPU before this benchmark: a failure is recorded, not fatal
                fn = lambda x=x: mma.matmul(x, backend="cuda")  # noqa: E731
                want = x.double() @ W.double().T
                err_c = ((fn().double() - want).norm() / want.norm()).item()  # (also tunes, outside a capture)
                t_c = timer(_graphed(fn) if M <= cuda_kernel.MAX_M else fn)
            except Exception as exc:  # noqa: BLE001
                rows.append(dict(common, impl=impl, error=f"{type(exc).__name__}: {exc}"[:500]))
                continue
            gbs_c = packed_bytes(N, K, bits, group) / t_c / 1e6
            rows.append(dict(common, impl=impl, ms=t_c, speedup=t_base / t_c,
                             **{"GB/s": gbs_c}, bw_fraction=gbs_c / bw if bw else None, rel_err=err_c))
    return rows


def act_order_case(K: int, N: int, bits: int = 4, M: int = 1, group: int = 128, device: str = "cuda",
                   timer=time_gpu) -> list[dict]:
    """Act-order ``g_idx`` (a random permutation of the groups) three ways (and on a GPU the CUDA GEMV, which
    gathers x in the kernel, against itself on the sorted weight): converted once to the decode
    layout (what ``QuantLinear`` runs: one gather of x, then the sorted kernel), passed per call to
    ``quant_matmul`` (the per-element gather path), and the same packed weight with sorted groups
    (``g_idx=None``); vs_sorted = ms / sorted ms."""
    dev = _device_name(device)
    dtype = torch.float16 if device == "cuda" else torch.float32
    graphs = M == 1 and device == "cuda"
    W, ck, g_idx = checkpoint(N, K, bits, group, device, seed=K + N + bits + 1, act_order=True)
    x = torch.randn(M, K, device=device, dtype=dtype)
    t_gather, t_base, err_gather = _measure(x, W, ck, bits, group, timer, W.to(dtype), graphs=graphs, g_idx=g_idx)
    dw = mk.to_decode_weight(*ck, g_idx, bits, group)
    want = x.double() @ W.double().T
    err = ((dw.matmul(x).double() - want).norm() / want.norm()).item()
    act = lambda: dw.matmul(x)  # noqa: E731
    srt = lambda: mk.quant_matmul(x, *ck, None, bits, group)  # noqa: E731
    if device == "cuda":
        maybe_graphed = _graphed if graphs else (lambda fn: fn)
        t_act, t_sorted = timer(maybe_graphed(act)), timer(maybe_graphed(srt))
    else:  # the ratio that matters: interleaved rounds on the shared CPU
        paired = time_cpu_paired({"act": act, "sorted": srt})
        t_act, t_sorted = paired["act"], paired["sorted"]
    common = dict(device=dev, K=K, N=N, M=M, bits=bits)
    rows = []
    if device == "cuda" and cuda_kernel.available() and mma_layout.supports(bits, group, K, N):
        try:  # the CUDA GEMV, which gathers x inside the kernel, against itself on the sorted weight
            act_c = mk.to_decode_weight(*ck, g_idx, bits, group, mma=True)
            srt_c = mk.to_decode_weight(*ck, None, bits, group, mma=True)
            err_c = ((act_c.matmul(x, backend="cuda").double() - want).norm() / want.norm()).item()
            t_act_c = timer(_graphed(lambda: act_c.matmul(x, backend="cuda")))
            t_srt_c = timer(_graphed(lambda: srt_c.matmul(x, backend="cuda")))
            rows += [dict(common, impl="maca_kernels CUDA mma GEMV act-order", ms=t_act_c, speedup=t_base / t_act_c,
                          vs_sorted=t_act_c / t_srt_c, rel_err=err_c),
                     dict(common, impl="maca_kernels CUDA mma GEMV sorted", ms=t_srt_c, speedup=t_base / t_srt_c,
                          vs_sorted=1.0)]
        except Exception as exc:  # noqa: BLE001 - not yet run on a GPU: recorded, not fatal
            rows.append(dict(common, impl="maca_kernels CUDA mma GEMV act-order",
                             error=f"{type(exc).__name__}: {exc}"[:500]))
    return rows + [
        dict(common, impl="maca_kernels act-order, decode layout", ms=t_act, speedup=t_base / t_act,
             vs_sorted=t_act / t_sorted, rel_err=err),
        dict(common, impl="maca_kernels act-order, g_idx per call", ms=t_gather, speedup=t_base / t_gather,
             vs_sorted=t_gather / t_sorted, rel_err=err_gather),
        dict(common, impl="maca_kernels sorted groups", ms=t_sorted, speedup=t_base / t_sorted, vs_sorted=1.0),
        dict(common, impl="torch fp16 matmul" if device == "cuda" else "torch fp32 F.linear (dequantized)",
             ms=t_base, speedup=1.0),
    ]


def bench_gpu(group: int = 128) -> list[dict]:
    rows = []
    bw = copy_bandwidth()
    for K, N in SHAPES:
        for bits in (4, 3, 2):
            rows += gpu_case(K, N, bits, group=group, bw=bw)
            torch.cuda.empty_cache()
        rows += act_order_case(K, N, group=group)
        torch.cuda.empty_cache()
    return rows


def bench_cpu(K: int = 4096, N: int = 4096, group: int = 128) -> list[dict]:
    rows = []
    dev = f"cpu ({torch.get_num_threads()} threads)"
    timer = lambda fn: time_cpu(fn, warmup=3, reps=20)  # noqa: E731
    for bits in (4, 3, 2):
        W, ck, _ = checkpoint(N, K, bits, group, "cpu", seed=bits)
        for M in (1, 16):
            t_ours, t_base, err = _measure(torch.randn(M, K), W, ck, bits, group, timer, W)
            gbs = packed_bytes(N, K, bits, group) / t_ours / 1e6
            common = dict(device=dev, K=K, N=N, M=M, bits=bits)
            rows.append(dict(common, impl="maca_kernels C++", ms=t_ours, speedup=t_base / t_ours, **{"GB/s": gbs},
                             rel_err=err))
            rows.append(dict(common, impl="torch fp32 F.linear (dequantized)", ms=t_base, speedup=1.0,
                             **{"GB/s": N * K * 4 / t_base / 1e6}))
        rows += act_order_case(K, N, bits, M=1, group=group, device="cpu", timer=timer)
    return rows


def main() -> None:
    run_benchmark("quant_matmul", __doc__, bench_cpu, bench_gpu, COLUMNS,
                  "speedup = baseline ms / impl ms; GB/s counts packed weight + scales + zeros")


if __name__ == "__main__":
    main()
