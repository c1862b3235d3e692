"""Run every benchmark (``make bench``); each writes JSON under benchmarks/out/ and prints a table."""

from __future__ import annotations

import sys

from benchmarks import bench_gptq, bench_hessian, bench_quant_matmul

BENCHMARKS = [bench_hessian, bench_gptq, bench_quant_matmul]

if __name__ == "__main__":
    for bench in BENCHMARKS:
        sys.argv = [bench.__name__]
        bench.main()
