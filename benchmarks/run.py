"""Run every benchmark (``make bench``); each writes JSON under benchmarks/out/ and prints a table."""

from __future__ import annotations

import sys

from benchmarks import bench_cpu_load, bench_gptq, bench_hessian, bench_pipeline, bench_quant_matmul

# bench_cpu_load: the C++ kernels with 1 and 2 threads, quiet and beside a competing process
BENCHMARKS = [bench_hessian, bench_gptq, bench_quant_matmul, bench_cpu_load, bench_pipeline]

if __name__ == "__main__":
    for bench in BENCHMARKS:
        sys.argv = [bench.__name__]
        bench.main()
