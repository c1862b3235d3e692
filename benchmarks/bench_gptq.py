"""gptq_quantize: the fused solver vs the plain-PyTorch reference algorithm (SPEC §5).

GPU: 4096×4096 and 14336×4096 (out × in), 4-bit g128 act-order, GPTQ and GPTAQ: time per layer,
speedup, relative loss difference. CPU: the reference sweep (the CPU path) against a lower bound any
implementation pays, the same layer's lazy-update GEMMs and Cholesky factorisations timed alone.

    python -m benchmarks.bench_gptq [--cpu] [--gpu]
"""

from __future__ import annotations

import os
import sys
import time

import torch

import maca_kernels as mk
from benchmarks.common import run_benchmark, time_cpu
from maca_kernels.ops.gptq.prepare import prepare

COLUMNS = ["device", "shape", "method", "impl", "ms", "speedup", "loss", "loss_vs_ref", "vs_floor"]
SETTINGS = dict(bits=4, group_size=128, act_order=True)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def problem(N: int, K: int, device: str, tokens: int = 8192, seed: int = 0):
    sys.path.insert(0, os.path.join(ROOT, "tests", "ops", "gptq"))
    from gptq_helpers import correlated_problem

    return correlated_problem(N, K, seed=seed, tokens=tokens, device=device)


def _time_once(fn, device: str, warmup: bool = True) -> tuple[float, object]:
    """One timed call, after one warm-up call unless ``warmup=False`` (a layer solve is long: no need
    for many repeats)."""
    if warmup:
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3, out


def gpu_case(N: int, K: int, methods=("gptq", "gptaq"), device: str = "cuda", ref_warmup: bool = True,
             tokens: int = 8192) -> list[dict]:
    """Fused solver vs the reference sweep for one layer shape. ``ref_warmup=False`` times the reference
    from a single cold call (the kernel's warm-up already initialised cuBLAS/cuSOLVER): cheaper when the
    reference is slow, and says so in the row."""
    dev = torch.cuda.get_device_name() if device == "cuda" else f"{device} ({torch.get_num_threads()} threads)"
    ours = "triton" if device == "cuda" else None  # off CUDA (dry runs): the device's default backend
    W, H, dxxt = problem(N, K, device, tokens=tokens)
    rows = []
    for method in methods:
        kw = dict(SETTINGS, **({"dxxt": dxxt} if method == "gptaq" else {}))
        t_ker, ker = _time_once(lambda kw=kw: mk.gptq_quantize(W, H, backend=ours, **kw), device)
        t_ref, ref = _time_once(lambda kw=kw: mk.gptq_quantize(W, H, backend="reference", **kw), device,
                                warmup=ref_warmup)
        for impl, t, r in (("maca_kernels fused", t_ker, ker), ("reference (plain PyTorch)", t_ref, ref)):
            rows.append(dict(device=dev, shape=f"{N}x{K}", method=method, impl=impl, ms=t, speedup=t_ref / t,
                             loss=r.loss, loss_vs_ref=r.loss / ref.loss - 1,
                             timing="1 call after 1 warm-up" if impl != "reference (plain PyTorch)" or ref_warmup
                             else "1 cold call (no warm-up)"))
    return rows


def bench_gpu() -> list[dict]:
    rows = []
    for N, K in ((4096, 4096), (14336, 4096)):
        rows += gpu_case(N, K)
        torch.cuda.empty_cache()
    return rows


def bench_cpu(N: int = 4096, K: int = 4096) -> list[dict]:
    from maca_kernels.ops.gptq.cpu_kernel import gptq_sweep_cpp

    torch.manual_seed(0)
    W, H, _ = problem(N, K, "cpu")
    dev = f"cpu ({torch.get_num_threads()} threads)"
    prep_kw = dict(bits=4, group_size=128, sym=False, act_order=True, static_groups=False, damp=0.01,
                   block_size=128, mse=False)
    res = {}

    def solve(backend):
        res[backend] = mk.gptq_quantize(W, H, backend=backend, **SETTINGS)

    t_ref = time_cpu(lambda: solve("reference"), warmup=0, reps=1)
    t_cpp = time_cpu(lambda: solve("cpp"), warmup=1, reps=3)
    t_sweep = time_cpu(lambda: gptq_sweep_cpp(prepare(W, H, **prep_kw), 4, 128, False, False), warmup=0, reps=3)
    prep = prepare(W, H, **prep_kw)
    Err = torch.randn(N, 128)

    def floor():  # what every implementation must do: factorisations + lazy updates
        prepare(W, H, **prep_kw)
        Wc = prep.W  # values drift over repeats; only the time matters
        for i1 in range(0, K - 128, 128):
            Wc[:, i1 + 128 :].addmm_(Err, prep.U[i1 : i1 + 128, i1 + 128 :], alpha=-1.0)

    t_floor = time_cpu(floor, warmup=0, reps=3)
    shape = f"{N}x{K}"
    ref, cpp = res["reference"], res["cpp"]
    base = dict(device=dev, shape=shape, method="gptq")
    return [
        dict(base, impl="reference sweep (plain PyTorch)", ms=t_ref, speedup=1.0, loss=ref.loss, loss_vs_ref=0.0,
             vs_floor=t_ref / t_floor),
        dict(base, impl="maca_kernels cpp (CPU default)", ms=t_cpp, speedup=t_ref / t_cpp, loss=cpp.loss,
             loss_vs_ref=cpp.loss / ref.loss - 1, vs_floor=t_cpp / t_floor),
        dict(base, impl="cpp: prepare + sweep only", ms=t_sweep, speedup=t_ref / t_sweep, vs_floor=t_sweep / t_floor),
        dict(base, impl="floor: Cholesky + lazy GEMMs only", ms=t_floor, speedup=t_ref / t_floor, vs_floor=1.0),
    ]


def main() -> None:
    legend = ("speedup = reference ms / impl ms. CPU: vs_floor = impl ms / floor ms, the floor being the Cholesky "
              "factorisations + lazy-update GEMMs any implementation pays; the full solves also pay the result "
              "assembly (loss tr(ΔW H ΔWᵀ): one more N×K×K GEMM), the 'prepare + sweep only' row does not")
    run_benchmark("gptq", __doc__, bench_cpu, bench_gpu, COLUMNS, legend)


if __name__ == "__main__":
    main()
