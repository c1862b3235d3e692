"""accumulate_hessian: fused kernels vs the baselines of SPEC §5.

GPU: the Triton kernel (MaCa weighting) vs cuBLAS bf16 ``xᵀx`` with fp32 output and no weighting, and
vs the reference fp32 accumulation (upcast, ``H += w · X_sᵀ X_s`` per sequence); d ∈ {4096, 8192},
256k tokens in a 128/512/1024/2048 length mix; errors vs float64 for all three. Also the GPTAQ cross term
``Σ w ΔXᵀX`` against H alone (d=4096), and the per-call overhead of ``accumulate_hessian`` in a loop at
16k tokens, d=4096 (wall time per call vs the call timed alone, and the host syncs torch reports).
CPU: the C++ kernel vs torch fp32 ``xᵀx`` (no weighting) at d=1024, 64k tokens, all cores.

    python -m benchmarks.bench_hessian [--cpu] [--gpu] [--tokens N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import maca_kernels as mk
from benchmarks.common import run_benchmark, time_cpu, time_gpu
from maca_kernels.ops.hessian import gram_from_plan, make_plan
from maca_kernels.ops.hessian.reference import weighted_gram_reference

COLUMNS = ["device", "case", "d", "tokens", "dtype", "impl", "ms", "tflops", "speedup", "rel_err_fp64", "kernel_ms",
           "overhead", "host_syncs"]


def maca_lengths(total: int, seed: int = 0, mix=(128, 512, 1024, 2048)) -> torch.Tensor:
    """A shuffled length mix with (about) equal token share per length, summing to ``total``."""
    g = torch.Generator().manual_seed(seed)
    per = total // len(mix)
    lengths = torch.cat([torch.full((max(1, per // n),), n) for n in mix])
    lengths = lengths[torch.randperm(lengths.numel(), generator=g)]
    lengths = lengths[torch.cumsum(lengths, 0) <= total]
    rest = total - int(lengths.sum())
    return torch.cat([lengths, torch.tensor([rest])]) if rest else lengths


def gram64(x: torch.Tensor, lengths: torch.Tensor, weighted: bool, chunk: int = 16384) -> torch.Tensor:
    """float64 ground truth, computed in token chunks so the fp64 copy of x stays small."""
    d = x.shape[1]
    w = torch.repeat_interleave(1.0 / lengths.double() if weighted else torch.ones(lengths.numel(),
                                dtype=torch.float64), lengths).to(x.device)
    out = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], chunk):
        xs = x[s : s + chunk].double()
        out += (xs * w[s : s + chunk, None]).T @ xs
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def _cublas_bf16_gram(x: torch.Tensor) -> torch.Tensor:
    try:  # torch ≥ 2.8 on CUDA: bf16 inputs, fp32 output straight from cuBLAS
        return torch.mm(x.T, x, out_dtype=torch.float32)
    except (TypeError, NotImplementedError, RuntimeError):
        return (x.T @ x).float()


def cublas_gram_method(x: torch.Tensor) -> str:
    """Which baseline ``_cublas_bf16_gram`` runs for ``x`` (said beside the figure)."""
    try:
        torch.mm(x[:16].T, x[:16], out_dtype=torch.float32)
        return "torch.mm(x.T, x, out_dtype=torch.float32)"
    except (TypeError, NotImplementedError, RuntimeError):
        return "(x.T @ x).float() (bf16 matmul, bf16 out, then upcast: out_dtype unsupported)"


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def maca_case(d: int, tokens: int, device: str = "cuda", timer=time_gpu) -> list[dict]:
    """Ours (MaCa weights) vs cuBLAS bf16 ``xᵀx`` (fp32 out, no weighting) vs the reference fp32 loop."""
    dev = torch.cuda.get_device_name() if device == "cuda" else f"{device} ({torch.get_num_threads()} threads)"
    lengths = maca_lengths(tokens, seed=d)
    x = torch.randn(tokens, d, device=device, dtype=torch.bfloat16)
    flops_full = 2.0 * tokens * d * d  # count the full xᵀx for every impl so TFLOP/s compare
    truth_w = gram64(x, lengths, weighted=True)
    truth_u = gram64(x, lengths, weighted=False)
    mk.accumulate_hessian(x, lengths)  # autotune once, outside the timing
    ours = "maca_kernels (MaCa weights)"
    impls = {
        ours: (lambda: mk.accumulate_hessian(x, lengths, check_finite=False), truth_w),
        "cuBLAS bf16 xᵀx, fp32 out": (lambda: _cublas_bf16_gram(x), truth_u),
        "reference fp32 accumulation": (lambda: weighted_gram_reference(x, lengths, "sequence"), truth_w),
    }
    rows = []
    for name, (fn, truth) in impls.items():
        err = rel(fn(), truth)
        ms = timer(fn)
        rows.append(dict(device=dev, case="maca-mix", d=d, tokens=tokens, dtype="bf16", impl=name,
                         ms=ms, tflops=flops_full / ms / 1e9, rel_err_fp64=err))
    for r in rows:
        r["speedup"] = r["ms"] / rows[0]["ms"]  # baseline time over ours
    rows[1]["method"] = cublas_gram_method(x)
    return rows


def cross_term_case(d: int, tokens: int, device: str = "cuda", timer=time_gpu) -> list[dict]:
    """GPTAQ cross term ``Σ w ΔXᵀX`` (``gram_from_plan(cross=True)``) vs H alone on the same plan; errors vs
    float64 for ours and for the reference fp32 accumulation (upcast, per sequence)."""
    dev = torch.cuda.get_device_name() if device == "cuda" else f"{device} ({torch.get_num_threads()} threads)"
    lengths = maca_lengths(tokens, seed=d + 1)
    x = torch.randn(tokens, d, device=device, dtype=torch.bfloat16)
    x_fp = (x.float() + 0.05 * torch.randn_like(x, dtype=torch.float32)).to(torch.bfloat16)
    plan = make_plan(x, lengths, x_fp=x_fp, check_finite=False)

    def run(cross: bool, backend=None) -> torch.Tensor:
        out = torch.zeros(d, d, device=device, dtype=torch.float32)
        return gram_from_plan(plan, out, cross=cross, weighting="sequence", backend=backend)

    w = torch.repeat_interleave(1.0 / lengths.double(), lengths).to(device)
    truth = torch.zeros(d, d, dtype=torch.float64, device=device)
    for s in range(0, tokens, 16384):
        xs, dx = x[s : s + 16384].double(), x_fp[s : s + 16384].double() - x[s : s + 16384].double()
        truth += (dx * w[s : s + 16384, None]).T @ xs
    run(False), run(True)  # autotune both outside the timing
    t_h, t_cross = timer(lambda: run(False)), timer(lambda: run(True))
    common = dict(device=dev, case="gptaq-cross", d=d, tokens=tokens, dtype="bf16")
    return [
        dict(common, impl="maca_kernels H (Σ w XᵀX)", ms=t_h, speedup=1.0),
        dict(common, impl="maca_kernels cross term (Σ w ΔXᵀX)", ms=t_cross, speedup=t_h / t_cross,
             time_vs_H=t_cross / t_h, rel_err_fp64=rel(run(True), truth)),
        dict(common, impl="reference fp32 cross term", rel_err_fp64=rel(run(True, "reference"), truth)),
    ]


def count_host_syncs(fn) -> int | None:
    """Synchronising CUDA calls torch reports during ``fn()`` (``set_sync_debug_mode``); None off CUDA."""
    if not torch.cuda.is_available():
        return None
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def per_call_case(d: int = 4096, tokens: int = 16384, device: str = "cuda", timer=time_gpu, calls: int = 50,
                  loops: int = 5) -> list[dict]:
    """Per-call cost in a loop: median over ``loops`` of (wall time of ``calls`` back-to-back calls, one
    sync at the end) / ``calls``, against the time of one call measured alone by ``timer`` (do_bench on a
    GPU); overhead = loop / alone − 1. Two forms: ``HessianAccumulator.add`` with default arguments (the
    calibration hot path: its NaN/Inf check is deferred to the sums) and ``accumulate_hessian(x, lengths,
    out=H, check_finite=False)`` (the functional form; with its default check_finite=True it waits once
    per call for the NaN/Inf check)."""
    dev = torch.cuda.get_device_name() if device == "cuda" else f"{device} ({torch.get_num_threads()} threads)"
    lengths = maca_lengths(tokens, seed=7)
    x = torch.randn(tokens, d, device=device, dtype=torch.bfloat16)
    H = torch.zeros(d, d, device=device, dtype=torch.float32)
    acc = mk.HessianAccumulator(d, device=device)
    rows = []
    forms = (("HessianAccumulator.add, default args", lambda: acc.add(x, lengths)),
             ("accumulate_hessian(out=H), check_finite=False",
              lambda: mk.accumulate_hessian(x, lengths, out=H, check_finite=False)))
    for label, call in forms:
        call()
        _sync(device)
        alone = timer(call)
        per_call = []
        for _ in range(loops):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                call()
            _sync(device)
            per_call.append((time.perf_counter() - t0) * 1e3 / calls)
        loop = statistics.median(per_call)
        rows.append(dict(device=dev, case=f"per-call ({label})", d=d, tokens=tokens, dtype="bf16",
                         impl=f"loop of {calls} calls, wall / call", ms=loop, kernel_ms=alone,
                         overhead=loop / alone - 1, host_syncs=count_host_syncs(call)))
    return rows


def bench_gpu(tokens: int, dims=(4096, 8192)) -> list[dict]:
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for d in dims:
        rows += maca_case(d, tokens)
        torch.cuda.empty_cache()
    rows += cross_term_case(4096, tokens)
    torch.cuda.empty_cache()
    rows += per_call_case()
    return rows


def _cpu_case(dtype: torch.dtype, tokens: int, d: int, lengths: torch.Tensor, dev: str) -> list[dict]:
    x = torch.randn(tokens, d).to(dtype)
    xf = x.float()
    flops = 2.0 * tokens * d * d
    name = str(dtype).split(".")[1]
    ours = lambda: mk.accumulate_hessian(x, lengths, check_finite=False)  # noqa: E731
    base = lambda: xf.T @ xf  # noqa: E731
    t_ours, t_base = time_cpu(ours), time_cpu(base)
    common = dict(device=dev, case="maca-mix", d=d, tokens=tokens, dtype=name)
    return [
        dict(common, impl="maca_kernels C++", ms=t_ours, tflops=flops / t_ours / 1e9, speedup=1.0,
             rel_err_fp64=rel(ours(), gram64(x, lengths, weighted=True))),
        dict(common, impl="torch fp32 xᵀx (no weighting)", ms=t_base, tflops=flops / t_base / 1e9,
             speedup=t_base / t_ours, rel_err_fp64=rel(base(), gram64(x, lengths, weighted=False))),
    ]


def bench_cpu(tokens: int = 65536, d: int = 1024) -> list[dict]:
    lengths = maca_lengths(tokens, seed=1)
    dev = f"cpu ({torch.get_num_threads()} threads)"
    return [row for dtype in (torch.float32, torch.bfloat16) for row in _cpu_case(dtype, tokens, d, lengths, dev)]


def _tokens() -> int:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--tokens", type=int, default=256 * 1024, help="GPU token count")
    return p.parse_known_args()[0].tokens


def main() -> None:
    run_benchmark("hessian", __doc__, bench_cpu, lambda: bench_gpu(_tokens()), COLUMNS,
                  "speedup = baseline ms / maca_kernels ms; tflops count the full xᵀx (2·T·d²) for every impl")


if __name__ == "__main__":
    main()
