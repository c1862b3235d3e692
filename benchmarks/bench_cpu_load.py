"""C++ CPU kernels on a busy machine: 1 vs 2 threads, quiet and beside a competing busy process.

A kernel whose threads wait for each other falls off a cliff when one of them is preempted (ENGINEERING.md,
"CPU measurements on a shared 2-core machine"). This measures the median time of

  * quant_matmul, M = 1, int4, 4096×4096, group 128 (``cpu_quant_matmul``),
  * the weighted Gram (Hessian) kernel, d = 1024, 16k tokens fp32 in a 128/512/1024/2048 length mix
    (``cpu_weighted_gram``),
  * one GPTQ column block (128 columns × 4096 rows, dynamic g128 groups, ``_C.gptq_block_sweep``),

with 1 and 2 threads, quiet and while a single-threaded Python spinner (``while True: pass``, started
here with multiprocessing and killed at the end) competes for a core. Rounds alternate quiet and loaded
so that drift hits both; the figures are medians over rounds of per-round medians. Target: 2 threads
under load no slower than 1 thread under load (``load_2t/1t`` ≤ 1), quiet 2-thread speed kept.

    python -m benchmarks.bench_cpu_load [--rounds R] [--only qmm,hessian,gptq] [--native PATH_TO_C_SO]

``--native`` loads another build of the extension (e.g. a saved copy of an older ``_C*.so``) in place
of ``maca_kernels._C``, for a before/after comparison on the same machine state.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import statistics
import sys
import time

COLUMNS = ["kernel", "threads", "load", "ms", "p90_ms", "range_ms", "vs_1t"]
LEGEND = (
    "ms: median over rounds of each round's median; range_ms: min-max of the round medians; p90_ms: 90th "
    "percentile of all calls; vs_1t: this row's ms / the 1-thread ms under the same load"
)


def _spin(ready) -> None:  # the competing process: one busy core's worth of work, nothing else
    ready.set()
    while True:
        pass


class Spinner:
    """A busy single-threaded process for the duration of a ``with`` block."""

    def __enter__(self):
        ctx = mp.get_context("spawn")
        ready = ctx.Event()
        self.proc = ctx.Process(target=_spin, args=(ready,), daemon=True)
        self.proc.start()
        if not ready.wait(60):
            raise RuntimeError("spinner did not start")
        time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.join()


def _load_native(path: str) -> None:
    spec = importlib.util.spec_from_file_location("maca_kernels._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["maca_kernels._C"] = module  # `from . import _C` in maca_kernels._native finds it here


def _times(fn, reps: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def qmm_case():
    import torch

    from maca_kernels.ops.quant_matmul.cpu_kernel import cpu_quant_matmul

    # Random words are valid packed checkpoint tensors: every bit pattern is a code / zero point.
    g = torch.Generator().manual_seed(4)
    N = K = 4096
    qw = torch.randint(-(2**31), 2**31, (K * 4 // 32, N), generator=g, dtype=torch.int64).to(torch.int32)
    qz = torch.randint(-(2**31), 2**31, (K // 128, N * 4 // 32), generator=g, dtype=torch.int64).to(torch.int32)
    sc = (torch.rand(K // 128, N, generator=g) * 0.01 + 0.001).half()
    x = torch.randn(1, K, generator=g)
    out = torch.empty(1, 4096)
    return "quant_matmul M=1 int4 4096² g128", 300, lambda t: cpu_quant_matmul(
        x, qw, sc, qz, None, 4, 128, out=out, num_threads=t)


def hessian_case():
    import torch

    from benchmarks.bench_hessian import maca_lengths
    from maca_kernels.ops.hessian.cpu_kernel import cpu_weighted_gram

    d, tokens = 1024, 16384
    lengths = maca_lengths(tokens, seed=1)
    start = torch.cumsum(lengths, 0) - lengths
    runs = (start.to(torch.int64), lengths.to(torch.int64), (1.0 / lengths.double()).float())
    x = torch.randn(tokens, d)
    out = torch.zeros(d, d)
    return "hessian d=1024 16k tok fp32", 7, lambda t: cpu_weighted_gram(out, x, runs, num_threads=t)


def gptq_case():
    import torch

    from maca_kernels.ops.gptq.cpu_kernel import native_sweep

    C = native_sweep()
    g = torch.Generator().manual_seed(0)
    N, K, bs = 4096, 128, 128
    W = torch.randn(N, K, generator=g)
    A = torch.randn(K, K, generator=g) / K**0.5
    U = torch.linalg.cholesky(A @ A.T + torch.eye(K), upper=True).contiguous()
    codes = torch.empty(N, K, dtype=torch.int32)
    scales = torch.empty(N, 1)
    zeros = torch.empty(N, 1)
    err = torch.empty(N, bs)
    gpos = torch.zeros(K, dtype=torch.int64)

    def run(t):
        C.gptq_block_sweep(W.data_ptr(), K, N, 0, bs, U.data_ptr(), 0, K, codes.data_ptr(), K, scales.data_ptr(),
                           zeros.data_ptr(), 1, 128, gpos.data_ptr(), err.data_ptr(), 0, bs, 15, False, 0, 0, 2.4, t)

    return "gptq block 4096x128 g128", 40, run


CASES = {"qmm": qmm_case, "hessian": hessian_case, "gptq": gptq_case}


def bench(rounds: int, only: list[str]) -> list[dict]:
    cases = [CASES[name]() for name in only]
    samples = {}  # (case, threads, load) -> list of round medians, all calls
    for r in range(rounds):
        for load in ("quiet", "spinner"):
            spinner = Spinner() if load == "spinner" else None
            if spinner:
                spinner.__enter__()
            try:
                for name, reps, fn in cases:
                    for threads in ((1, 2) if r % 2 == 0 else (2, 1)):  # alternate the order too
                        t = _times(lambda fn=fn, threads=threads: fn(threads), reps)
                        meds, calls = samples.setdefault((name, threads, load), ([], []))
                        meds.append(statistics.median(t))
                        calls.extend(t)
            finally:
                if spinner:
                    spinner.__exit__(None, None, None)
        print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    rows = []
    for name, _, _ in cases:
        for load in ("quiet", "spinner"):
            for threads in (1, 2):
                meds, calls = samples[(name, threads, load)]
                calls = sorted(calls)
                rows.append(dict(kernel=name, threads=threads, load=load, ms=statistics.median(meds),
                                 p90_ms=calls[int(0.9 * (len(calls) - 1))],
                                 range_ms=f"{min(meds):.3g}-{max(meds):.3g}"))
            one = rows[-2]["ms"]
            rows[-2]["vs_1t"] = 1.0
            rows[-1]["vs_1t"] = rows[-1]["ms"] / one
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="quiet/loaded round pairs (default 5)")
    p.add_argument("--only", default="qmm,hessian,gptq", help="comma-separated subset of " + ",".join(CASES))
    p.add_argument("--native", default=None, help="path of another build of the _C extension to load instead")
    args = p.parse_args()
    if args.native:
        _load_native(args.native)
    only = [s for s in args.only.split(",") if s]
    for name in only:
        if name not in CASES:
            p.error(f"unknown case {name!r}")

    import maca_kernels._native as native
    from benchmarks.common import environment, print_table, write_results

    env = environment()
    env["native"] = args.native or native._C.__file__
    rows = bench(args.rounds, only)
    print_table(rows, COLUMNS)
    print(LEGEND)
    print("wrote", write_results("cpu_load", env, rows))


if __name__ == "__main__":
    main()
