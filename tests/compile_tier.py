"""Compile every Triton kernel variant for sm_90 and sm_80 on this (CPU) machine; print JSON.

Run as a subprocess by tests/test_compile_tier.py, without TRITON_INTERPRET (the compiler needs real
JIT functions). Usage: python tests/compile_tier.py [--jobs N] > results.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

# Every module with Triton kernels exposes aot_variants(); add new ops here.
KERNEL_MODULES = [
    "maca_kernels.ops.hessian.triton_kernel",
    "maca_kernels.ops.gptq.triton_kernel",
    "maca_kernels.ops.quant_matmul.triton_kernel",
]
ARCHS = (90, 80)


def variant_names() -> list[str]:
    return [v[0] for mod in KERNEL_MODULES for v in importlib.import_module(mod).aot_variants()]


def _compile(job):
    module, name, arch = job
    from maca_kernels._aot import compile_kernel

    for tag, fn, sig, const, opts in importlib.import_module(module).aot_variants():
        if tag == name:
            try:
                k = compile_kernel(tag, fn, sig, const, opts, arch)
            except Exception as exc:  # reported, not raised: one failure must not hide the others
                return {"name": name, "arch": arch, "error": f"{type(exc).__name__}: {exc}"[:2000]}
            ptx = k.ptx
            return {
                "name": name, "arch": arch, "registers": k.registers, "spill_bytes": k.spill_bytes,
                "shared_bytes": k.shared_bytes, "wgmma": "wgmma.mma_async" in ptx, "mma_sync": "mma.sync" in ptx,
                "cp_async": "cp.async" in ptx, "pipelined": "async_copy_global_to_local" in k.ttgir,
            }
    return {"name": name, "arch": arch, "error": "variant not found"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("compile_tier.py must run without TRITON_INTERPRET=1")
    jobs = [(mod, v[0], arch) for mod in KERNEL_MODULES
            for v in importlib.import_module(mod).aot_variants() for arch in ARCHS]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(_compile, jobs))
    json.dump(results, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
