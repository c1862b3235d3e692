"""Run every benchmark (``make bench``); each writes JSON under benchmarks/out/ and prints a table."""

from __future__ import annotations

import sys

from benchmarks import bench_hessian

BENCHMARKS = [bench_hessian]

if __name__ == "__main__":
    for bench in BENCHMARKS:
        sys.argv = [bench.__name__]
        bench.main()
