"""accumulate_hessian: fused kernels vs the baselines of SPEC §5.

GPU: the Triton kernel (MaCa weighting) vs cuBLAS bf16 ``xᵀx`` with fp32 output and no weighting, and
vs the reference fp32 accumulation (upcast, ``H += w · X_sᵀ X_s`` per sequence); d ∈ {4096, 8192},
256k tokens in a 128/512/1024/2048 length mix; errors vs float64 for all three.
CPU: the C++ kernel vs torch fp32 ``xᵀx`` (no weighting) at d=1024, 64k tokens, all cores.

    python -m benchmarks.bench_hessian [--cpu] [--gpu] [--tokens N]
"""

from __future__ import annotations

import argparse

import torch

import maca_kernels as mk
from benchmarks.common import run_benchmark, time_cpu, time_gpu
from maca_kernels.ops.hessian.reference import weighted_gram_reference

COLUMNS = ["device", "case", "d", "tokens", "dtype", "impl", "ms", "tflops", "speedup", "rel_err_fp64"]


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
    try:  # torch ≥ 2.8: bf16 inputs, fp32 output straight from cuBLAS
        return torch.mm(x.T, x, out_dtype=torch.float32)
    except TypeError:
        return (x.T @ x).float()


def _gpu_case(d: int, tokens: int, dev: str) -> list[dict]:
    lengths = maca_lengths(tokens, seed=d)
    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
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
        ms = time_gpu(fn)
        rows.append(dict(device=dev, case="maca-mix", d=d, tokens=tokens, dtype="bf16", impl=name,
                         ms=ms, tflops=flops_full / ms / 1e9, rel_err_fp64=err))
    for r in rows:
        r["speedup"] = r["ms"] / rows[0]["ms"]  # baseline time over ours
    return rows


def bench_gpu(tokens: int, dims=(4096, 8192)) -> list[dict]:
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for d in dims:
        rows += _gpu_case(d, tokens, torch.cuda.get_device_name())
        torch.cuda.empty_cache()
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
