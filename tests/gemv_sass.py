"""The CUDA GEMV (csrc/quant_matmul/gemv_mma.cu) as it executes: nvcc builds it for sm_90a on this CPU machine,
and the SASS walker (sass_walk.py) follows one warp's path at the split and tile choices the launcher makes for
SPEC §5's shapes (K x N = 4096 x 4096 and 8192 x 28672; M = 1, M = 16 for the _m16 kernels). Figures are
thread-instructions per weight: a warp's executed instructions x 32 / the 16 x k_split weights it processes.

``python tests/gemv_sass.py`` prints the table of every variant at both shapes.
"""

from __future__ import annotations

import functools
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sass_walk import Budget, Function, Plan, walk

N_SMS = 132  # H100 SXM / H200
SHAPES = {"4096x4096": (4096, 4096), "8192x28672": (8192, 28672)}  # SPEC §5: K x N
# kernel -> per shape (4096x4096, 8192x28672): (per chunk: warps without / with x staging, whole kernel: the
# CTA's four warps averaged, the split-K reduction amortised over the splits), thread-instructions per
# weight, M = 1 (M = 16 for _m16): today's binary (nvcc 13.0, sm_90a), as walked. tests/test_sass_walk.py
# holds them within ±3%; tests/test_cuda_compile_tier.py holds them to SPEC §5's budgets.
WALKED = {
    "b2_g0": ((1.55, 1.82, 2.35), (1.55, 1.82, 1.78)),
    "b2_g0_m16": ((3.52, 3.52, 4.64), (3.52, 3.52, 3.56)),
    "b2_g128": ((2.00, 2.27, 2.80), (2.00, 2.27, 2.17)),
    "b2_g128_m16": ((3.84, 3.84, 4.92), (3.84, 3.84, 3.88)),
    "b3_g0": ((2.18, 2.46, 3.04), (2.18, 2.46, 2.36)),
    "b3_g0_m16": ((4.20, 4.20, 5.38), (4.20, 4.20, 4.24)),
    "b3_g128": ((2.60, 2.87, 3.41), (2.60, 2.87, 2.77)),
    "b3_g128_m16": ((4.59, 4.59, 5.73), (4.59, 4.59, 4.64)),
    "b4_g0": ((1.67, 1.94, 2.43), (1.67, 1.94, 1.89)),
    "b4_g0_m16": ((3.65, 3.65, 4.73), (3.65, 3.65, 3.91)),
    "b4_g128": ((2.01, 2.28, 2.78), (2.01, 2.28, 2.18)),
    "b4_g128_m16": ((4.03, 4.03, 5.10), (4.03, 4.03, 4.07)),
    "b4_g32": ((2.75, 3.02, 3.52), (2.75, 3.02, 2.92)),
    "b4_g32_m16": ((4.98, 4.98, 6.04), (4.98, 4.98, 5.02)),
    "b4_g64": ((2.25, 2.51, 3.00), (2.25, 2.51, 2.41)),
    "b4_g64_m16": ((4.31, 4.31, 5.37), (4.31, 4.31, 4.35)),
    "bf16_b2_g0": ((1.67, 1.94, 2.47), (1.67, 1.94, 1.90)),
    "bf16_b2_g0_m16": ((3.64, 3.64, 4.76), (3.64, 3.64, 3.68)),
    "bf16_b2_g128": ((2.10, 2.37, 2.90), (2.10, 2.37, 2.27)),
    "bf16_b2_g128_m16": ((3.99, 3.99, 5.07), (3.99, 3.99, 4.03)),
    "bf16_b3_g0": ((2.46, 2.74, 3.32), (2.46, 2.74, 2.64)),
    "bf16_b3_g0_m16": ((4.48, 4.48, 5.66), (4.48, 4.48, 4.52)),
    "bf16_b3_g128": ((2.91, 3.18, 3.71), (2.91, 3.18, 3.08)),
    "bf16_b3_g128_m16": ((4.86, 4.86, 5.99), (4.86, 4.86, 4.90)),
    "bf16_b4_g0": ((1.92, 2.19, 2.68), (1.92, 2.19, 2.14)),
    "bf16_b4_g0_m16": ((3.90, 3.90, 4.98), (3.90, 3.90, 4.16)),
    "bf16_b4_g128": ((2.26, 2.53, 3.03), (2.26, 2.53, 2.43)),
    "bf16_b4_g128_m16": ((4.34, 4.34, 5.43), (4.34, 4.34, 4.38)),
    "bf16_b4_g32": ((3.01, 3.28, 3.77), (3.01, 3.28, 3.18)),
    "bf16_b4_g32_m16": ((5.27, 5.27, 6.34), (5.27, 5.27, 5.30)),
    "bf16_b4_g64": ((2.48, 2.75, 3.22), (2.48, 2.75, 2.64)),
    "bf16_b4_g64_m16": ((4.62, 4.62, 5.70), (4.62, 4.62, 4.66)),
}


@dataclass(frozen=True)
class Launch:
    """What cuda_kernel._gemv_mma_op launches for this kernel and shape (CTAs per SM: registers)."""

    bits: int
    group: int
    M: int
    K: int
    N: int
    resident: int

    @property
    def vec_k(self) -> int:
        from maca_kernels.ops.quant_matmul.mma_layout import VEC_K

        return VEC_K[self.bits]

    @property
    def n_ctas(self) -> int:
        return -(-self.N // 64)

    @property
    def k_split(self) -> int:
        from maca_kernels.ops.quant_matmul.cuda_kernel import k_split_for
        from maca_kernels.ops.quant_matmul.mma_layout import MmaWeight

        w = MmaWeight(None, None, None, None, self.bits, self.group or self.K, self.K, self.N)
        return k_split_for(w, self.n_ctas, N_SMS, self.resident)

    @property
    def splits(self) -> int:
        return -(-self.K // self.k_split)

    def chunks(self) -> list[int]:
        """c_len of each chunk of range 0 (kChunk = 512)."""
        k_end = min(self.K, self.k_split)
        return [min(512, k_end - c0) for c0 in range(0, k_end, 512)]


def resident_ctas(registers: int, smem: int) -> int:
    """CTAs of 128 threads per SM (sm_90: 64 K registers in 256-register units per warp, 64 warps, 32 CTAs,
    228 KB shared memory with 1 KB per CTA): what cuOccupancyMaxActiveBlocksPerMultiprocessor answers."""
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = (65536 // per_warp) // 4
    by_smem = (228 * 1024) // (smem + 1024)
    return min(by_regs, by_smem, 16, 32)


def gemv_plan(fn: Function, launch: Launch, mt: int, warp: int, reducer: bool) -> Plan:
    """The directions of one warp of CTA (x, 0) of this launch (gather = 0; ``reducer``: the last CTA of its
    column block, which adds the split-K partial sums)."""
    chunks = launch.chunks()
    assert len(set(chunks)) == 1, f"a short last chunk: {chunks}"  # both shapes split K into whole chunks
    c_len = chunks[0]
    per_load = (4 if launch.bits == 4 else 8) * mt  # HMMA per 128-bit load
    hmma = c_len // launch.vec_k * per_load
    stage = (c_len // 32) * 4 * launch.M  # x fragments (uint4) per chunk, threads 0.. stage one each per pass
    stage_passes = max(0, -(-(stage - 32 * warp) // 128))
    red = launch.M * 64  # outputs the reducer adds up, one per thread per pass
    red_passes = max(0, -(-(red - 32 * warp) // 128)) if reducer else 0

    def chunk_loop(f):
        return min((lp for lp in f.loops if lp.ops["HMMA"]), key=lambda lp: lp.depth)

    def reduce_loop(f):
        return min((lp for lp in f.loops if f.ops(lp.start, lp.end + 1, full=True)["LDG.E.STRONG.GPU"]),
                   key=lambda lp: lp.depth)

    split = launch.splits > 1

    def override(b):
        if b.kind == "exit" and b.exit_ordinal == 0:  # after the stores: one range, y written
            return not split
        if b.kind == "exit" and b.exit_ordinal == 1:  # after the arrival count: not the last CTA
            return not reducer
        if b.kind == "forward" and any(k.startswith("ATOMG") for k in b.skipped):  # thread 0 counts arrival
            return warp != 0
        if b.sides is not None:
            then, other = b.sides
            f2fp = [any(k.startswith("F2FP") for k in s) for s in (then, other)]
            if f2fp[0] != f2fp[1]:  # y (cast to x's type) or the fp32 partial sums
                return f2fp[1] == (not split)
            ldg = [sum(v for k, v in s.items() if k.startswith("LDG")) for s in (then, other)]
            if ldg[0] != ldg[1]:  # x gathered through perm (more loads) or not: gather = 0
                return ldg[1] < ldg[0]
        if (b.kind == "forward" and any(k.startswith("STG") for k in b.skipped)
                and not any(k.startswith(("HMMA", "LDG", "STS")) for k in b.skipped)):
            # a store of y the compiler branched over rather than predicated: the last of the unrolled list,
            # row m = 8 (mt - 1) + 2t + 1; no lane of the warp stores it iff M <= 8 (mt - 1) + 1
            return launch.M <= 8 * (mt - 1) + 1
        return None

    return Plan([Budget("HMMA", hmma * len(chunks)), Budget("HMMA", hmma, chunk_loop),
                 Budget("STS.128", stage_passes, chunk_loop),
                 Budget("LDG.E.STRONG.GPU", launch.splits * red_passes),
                 Budget("LDG.E.STRONG.GPU", launch.splits, reduce_loop)], override)


@dataclass
class Figures:
    """Thread-instructions per weight (warp instructions x 32 / the warp's 16 x k_split weights)."""

    launch: Launch
    per_chunk: list[float]  # per warp: the chunk loop's instructions per chunk
    kernel: list[float]  # per warp, CTAs that do not reduce
    reducer: list[float]  # per warp, the CTA that reduces (the same as kernel without a split)
    spills: list[int]  # LDL + STL executed per warp (reducer CTA)
    prologue: int  # warp 0: instructions before the chunk loop
    epilogue: list[int]  # warp 0: after it, non-reducer / reducer

    @property
    def amortised(self) -> list[float]:
        """Per warp over the column block's CTAs: one in ``splits`` reduces."""
        s = self.launch.splits
        return [((s - 1) * a + b) / s for a, b in zip(self.kernel, self.reducer, strict=True)]

    @property
    def cta(self) -> float:
        return sum(self.amortised) / 4


def gemv_figures(fn: Function, launch: Launch, mt: int) -> Figures:
    weights = 16 * min(launch.K, launch.k_split)
    chunk = min((lp for lp in fn.loops if lp.ops["HMMA"]), key=lambda lp: lp.depth)
    n_chunks = len(launch.chunks())
    per_chunk, kernel, reducer, spills, epi = [], [], [], [], []
    for warp in range(4):
        plain = walk(fn, gemv_plan(fn, launch, mt, warp, False))
        red = walk(fn, gemv_plan(fn, launch, mt, warp, launch.splits > 1)) if launch.splits > 1 else plain
        per_chunk.append(plain.in_loop(chunk) / n_chunks * 32 / (16 * min(512, launch.k_split)))
        kernel.append(plain.count() * 32 / weights)
        reducer.append(red.count() * 32 / weights)
        spills.append(red.ops["LDL"] + red.ops["STL"])
        if warp == 0:
            prologue = plain.count(0, chunk.start)
            epi = [plain.count(chunk.end + 1), red.count(chunk.end + 1)]
    return Figures(launch, per_chunk, kernel, reducer, spills, prologue, epi)


@functools.cache
def compile_gemv(arch: str = "sm_90a") -> tuple[dict[str, list[str]], str]:
    """The SASS of every kernel in gemv_mma.cu (name -> lines) and ptxas's -v log; built once per session."""
    from test_cuda_compile_tier import NVCC, SOURCE, _functions, _nvdisasm

    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / f"gemv_{arch}.cubin"
        res = subprocess.run([NVCC, "-cubin", f"-arch={arch}", "-O3", "-Xptxas", "-v", "-o", str(cubin),
                              str(SOURCE)], capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-4000:]
        sass = subprocess.run([_nvdisasm(), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    return _functions(sass), res.stderr


@functools.cache
def walked_gemv() -> tuple[dict[str, Function], dict[str, tuple[int, int]]]:
    """sm_90a's kernels parsed for the walker, and each kernel's (registers, shared memory) from ptxas."""
    funcs, log = compile_gemv("sm_90a")
    resources = {}
    for name, regs, smem in re.findall(r"Compiling entry function '(\w+)'.*?Used (\d+) registers.*?(\d+) bytes smem",
                                       log, re.S):
        resources[name] = (int(regs), int(smem))
    return {k: Function(v) for k, v in funcs.items()}, resources


def variant_launch(name: str, shape: str, resources: tuple[int, int]) -> Launch:
    """The launch of kernel ``name`` at ``shape`` for M = 1 (M = 16 for the _m16 kernels)."""
    bits = int(re.search(r"_b(\d)_", name).group(1))
    group = int(re.search(r"_g(\d+)", name).group(1))
    K, N = SHAPES[shape]
    return Launch(bits, group, 16 if name.endswith("_m16") else 1, K, N, resident_ctas(*resources))


def figures(name: str, shape: str) -> Figures:
    """The executed figures of kernel ``name`` at ``shape``."""
    fns, resources = walked_gemv()
    return gemv_figures(fns[name], variant_launch(name, shape, resources[name]), 2 if name.endswith("_m16") else 1)


def table() -> str:
    fns, _ = walked_gemv()
    rows = ["| kernel | shape | CTAs/SM | k_split x splits | per chunk (no x / x staging) | whole kernel: "
            "not reducing / reducing CTA (warp 0) | CTA average, amortised | LDL+STL per warp |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in sorted(n for n in fns if n.startswith("maca_gemv_mma")):
        for shape in SHAPES:
            f = figures(name, shape)
            rows.append(f"| {name.removeprefix('maca_gemv_mma_')} | {shape} | {f.launch.resident} | "
                        f"{f.launch.k_split} x {f.launch.splits} | {min(f.per_chunk):.2f} / {max(f.per_chunk):.2f} | "
                        f"{f.kernel[0]:.2f} / {f.reducer[0]:.2f} | {f.cta:.2f} | {max(f.spills)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
