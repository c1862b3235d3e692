"""quant_matmul: packed 2/3/4-bit GEMV/GEMM vs fp16 ``torch.matmul`` (GPU) and torch fp32 (CPU).

GPU: K×N ∈ {4096×4096, 4096×14336, 14336×4096, 8192×28672}, M ∈ {1, 16, 128, 2048}, bits 2/3/4, group
128: time vs fp16 ``x @ Wᵀ``, effective bandwidth (packed weight + fp16 scales + packed zeros over the
time) as a fraction of the measured device-to-device copy bandwidth; L2 flushed between runs
(do_bench), CUDA graphs for M = 1 (launch cost). CPU: M = 1 and 16 at 4096×4096 vs torch fp32
``F.linear`` on the dequantized weight, all cores.

    python -m benchmarks.bench_quant_matmul [--cpu] [--gpu]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import maca_kernels as mk
from benchmarks.common import run_benchmark, time_cpu, time_gpu
from maca_kernels.formats.gptq import pack_gptq, pack_gptq_zeros

COLUMNS = ["device", "K", "N", "M", "bits", "impl", "ms", "speedup", "GB/s", "bw_fraction", "rel_err"]
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]


def checkpoint(N: int, K: int, bits: int, group: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    G = K // group
    codes = torch.randint(0, maxq + 1, (N, K), generator=g)
    zeros = torch.randint(1, maxq + 1, (N, G), generator=g)
    scales = (torch.rand(N, G, generator=g) * 0.01 + 0.001).half()
    W = ((codes - zeros.repeat_interleave(group, 1)).float() * scales.float().repeat_interleave(group, 1))
    ck = (pack_gptq(codes, bits), scales.T.contiguous(), pack_gptq_zeros(zeros, bits))
    return W.to(device), tuple(t.to(device) for t in ck)


def packed_bytes(N: int, K: int, bits: int, group: int) -> int:
    return N * K * bits // 8 + (K // group) * N * 2 + (K // group) * N * bits // 8


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in GB/s (read + write), the practical ceiling."""
    a = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = time_gpu(lambda: b.copy_(a))
    return 2 * a.numel() / ms / 1e6


def _graphed(fn):
    """Capture fn in a CUDA graph (M = 1 is launch-bound otherwise); returns a replay function."""
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


def _measure(x, W, ck, bits, group, timer, base_weight, graphs=False):
    qw, sc, qz = ck
    ours = lambda: mk.quant_matmul(x, qw, sc, qz, None, bits, group)  # noqa: E731
    base = lambda: F.linear(x, base_weight)  # noqa: E731  (x @ Wᵀ in the weight's dtype)
    want = x.double() @ W.double().T
    err = ((ours().double() - want).norm() / want.norm()).item()
    if graphs:
        ours, base = _graphed(ours), _graphed(base)
    return timer(ours), timer(base), err


def bench_gpu(group: int = 128) -> list[dict]:
    rows = []
    dev = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    for K, N in SHAPES:
        for bits in (4, 3, 2):
            W, ck = checkpoint(N, K, bits, group, "cuda", seed=K + N + bits)
            for M in (1, 16, 128, 2048):
                x = torch.randn(M, K, device="cuda", dtype=torch.float16)
                t_ours, t_base, err = _measure(x, W, ck, bits, group, time_gpu, W.half(), graphs=M == 1)
                gbs = packed_bytes(N, K, bits, group) / t_ours / 1e6
                common = dict(device=dev, K=K, N=N, M=M, bits=bits)
                rows.append(dict(common, impl="maca_kernels", ms=t_ours, speedup=t_base / t_ours, **{"GB/s": gbs},
                                 bw_fraction=gbs / bw, rel_err=err))
                rows.append(dict(common, impl="torch fp16 matmul", ms=t_base, speedup=1.0))
            del W, ck
            torch.cuda.empty_cache()
    return rows


def bench_cpu(K: int = 4096, N: int = 4096, group: int = 128) -> list[dict]:
    rows = []
    dev = f"cpu ({torch.get_num_threads()} threads)"
    timer = lambda fn: time_cpu(fn, warmup=3, reps=20)  # noqa: E731
    for bits in (4, 3, 2):
        W, ck = checkpoint(N, K, bits, group, "cpu", seed=bits)
        for M in (1, 16):
            t_ours, t_base, err = _measure(torch.randn(M, K), W, ck, bits, group, timer, W)
            gbs = packed_bytes(N, K, bits, group) / t_ours / 1e6
            common = dict(device=dev, K=K, N=N, M=M, bits=bits)
            rows.append(dict(common, impl="maca_kernels C++", ms=t_ours, speedup=t_base / t_ours, **{"GB/s": gbs},
                             rel_err=err))
            rows.append(dict(common, impl="torch fp32 F.linear (dequantized)", ms=t_base, speedup=1.0,
                             **{"GB/s": N * K * 4 / t_base / 1e6}))
    return rows


def main() -> None:
    run_benchmark("quant_matmul", __doc__, bench_cpu, bench_gpu, COLUMNS,
                  "speedup = baseline ms / impl ms; GB/s counts packed weight + scales + zeros")


if __name__ == "__main__":
    main()
