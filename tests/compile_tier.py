"""Compile every Triton kernel variant for sm_90 and sm_80 on this (CPU) machine; write JSON.

Run as a subprocess by tests/test_compile_tier.py, without TRITON_INTERPRET (the compiler needs real
JIT functions). Usage: python tests/compile_tier.py [--jobs N] [--out FILE] [--only SUBSTRING]
(JSON to stdout without --out).

Each module's ``aot_variants()`` yields ``maca_kernels._aot.Variant``s: the kernel with representative
argument values and the launch keywords, as its launcher calls it. The signature, constexprs and
divisibility attributes come from triton's own JIT binder (see ``_aot.specialise``), so this compiles
what ``kernel[grid](...)`` compiles on the GPU. Variants whose compile inputs are identical (triton's
cache key: e.g. the same config at two shapes whose sizes are all multiples of 16) are compiled once;
the result is reported under every name, with ``same_as`` naming the one compiled.

Wall time on a 2-core machine: see tests/test_compile_tier.py. Triton's on-disk cache (and the ptxas
usage cache beside it) makes reruns fast.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor

# Every module with Triton kernels exposes aot_variants(); add new ops here.
KERNEL_MODULES = [
    "maca_kernels.ops.gptq.triton_kernel",  # slowest compiles first: better load balance
    "maca_kernels.ops.hessian.triton_kernel",
    "maca_kernels.ops.quant_matmul.triton_kernel",
]
ARCHS = (90, 80)


@functools.cache
def _variants(module: str) -> dict:
    out = {}
    for v in importlib.import_module(module).aot_variants():
        if v.name in out:
            raise ValueError(f"{module}: duplicate variant name {v.name}")
        out[v.name] = v
    return out


def _compiled_for(v, arch: int) -> bool:
    if arch not in v.archs:
        return False
    # sm_80 is compiled for a representative subset to keep the tier's wall time down: split-K configs
    # only with SPLIT_K = 1 (the split changes the K-loop bounds, not the tile; sm_90 compiles every one,
    # and the sm_80 checks are compile errors, shared memory and mma.sync, not spills).
    return arch != 80 or v.kwargs.get("SPLIT_K", 1) == 1


def variant_ids() -> list[tuple[str, int]]:
    """(name, arch) of every variant compiled, in order. Cheap: enumerates, does not specialise (works
    under TRITON_INTERPRET=1, where the test collection runs)."""
    return [(name, arch) for mod in KERNEL_MODULES for name, v in _variants(mod).items()
            for arch in ARCHS if _compiled_for(v, arch)]


@functools.cache
def _tier_version() -> str:
    """Results are cached per compile key and version of the code that measures them."""
    import maca_kernels._aot as aot

    digest = hashlib.sha256()
    for path in (__file__, aot.__file__):
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def _result_cache(key: str) -> str:
    from triton import knobs

    folder = os.path.join(knobs.cache.dir, "maca_aot_results")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, hashlib.sha256(f"{key}-{_tier_version()}".encode()).hexdigest() + ".json")


def _compile(job):
    module, name, arch, key = job
    cached = _result_cache(key)
    if os.path.exists(cached):
        with open(cached) as f:
            return dict(json.load(f), name=name, arch=arch, cached=True)
    res = _measure(module, name, arch)
    if "error" not in res:
        tmp = f"{cached}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(res, f)
        os.replace(tmp, cached)
    return res


def _measure(module, name, arch):
    from maca_kernels._aot import SHARED_LIMIT, compile_variant, describe, main_loop_sass

    v = _variants(module)[name]
    t0 = time.perf_counter()
    try:
        k = compile_variant(v, arch)
        spec = describe(v, arch)
    except Exception as exc:  # reported, not raised: one failure must not hide the others
        return {"name": name, "arch": arch, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    ptx = k.ptx
    res = {
        "name": name, "arch": arch, "registers": k.registers, "spill_bytes": k.spill_bytes,
        "shared_bytes": k.shared_bytes, "shared_limit": SHARED_LIMIT[arch],
        "wgmma": "wgmma.mma_async" in ptx, "mma_sync": "mma.sync" in ptx,
        "cp_async": "cp.async" in ptx, "pipelined": "async_copy_global_to_local" in k.ttgir,
        "ld_global_v4": re.search(r"ld\.global[\w:.]*\.v4\.", ptx) is not None,
        "num_warps": spec["num_warps"], "num_stages": spec["num_stages"],
        # what the JIT's specialisation decided: ints it made constexpr, args left without 16-divisibility
        "jit_constexprs": {a: c for a, c in spec["constexprs"].items() if a not in v.kwargs},
        "not_divisible": [a for a, ty in spec["signature"].items() if not ty.endswith("/D")],
        "compile_s": round(time.perf_counter() - t0, 2),
    }
    if v.kwargs.get("GEMV") and k.cubin:
        res["main_loop_sass"] = main_loop_sass(k.cubin)
    res.update(v.meta)
    return res


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", help="write the JSON here instead of stdout")
    parser.add_argument("--only", help="only variants whose name contains this")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("compile_tier.py must run without TRITON_INTERPRET=1")
    from maca_kernels._aot import compile_key

    t0 = time.perf_counter()
    owner = {name: mod for mod in KERNEL_MODULES for name in _variants(mod)}
    ids = [(n, a) for n, a in variant_ids() if not args.only or args.only in n]
    first: dict[str, tuple[str, int]] = {}  # compile key -> (name, arch) compiled for it
    alias = {}
    for name, arch in ids:
        key = compile_key(_variants(owner[name])[name], arch)
        alias[(name, arch)] = first.setdefault(key, (name, arch))
    jobs = [(owner[n], n, a, key) for key, (n, a) in first.items()]
    with ProcessPoolExecutor(args.jobs) as pool:
        compiled = {(r["name"], r["arch"]): r for r in pool.map(_compile, jobs)}
    results = []
    for name, arch in ids:
        src = alias[(name, arch)]
        r = dict(compiled[src], name=name, arch=arch)
        r.update(_variants(owner[name])[name].meta)
        if src != (name, arch):
            r["same_as"] = src[0]
            r.pop("compile_s", None)
            r.pop("cached", None)
        results.append(r)
    summary = {"variants": len(ids), "compiles": len(jobs), "jobs": args.jobs,
               "cached": sum(1 for r in compiled.values() if r.get("cached")),
               "wall_s": round(time.perf_counter() - t0, 1), "results": results}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    else:
        json.dump(summary, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
