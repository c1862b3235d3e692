"""The CUDA GEMV (csrc/quant_matmul/gemv_mma.cu) as it executes: nvcc builds it for sm_90a on this CPU machine,
and the SASS walker (sass_walk.py) follows each warp's path at the slicing the launcher chooses for SPEC §5's
shapes (K x N = 4096 x 4096 and 8192 x 28672 on 132 SMs; M = 1, M = 16 for the _m16 kernels): prologue, load
ring, groups, remainder, the slices' sums and the stores. Figures are thread-instructions per weight: a warp's
executed instructions x 32 / the 16 x (its K) weights it processes; the whole kernel is a CTA's warps together
over its 16 x K weights.

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
# kernel -> whole kernel per shape (4096x4096, 8192x28672), thread-instructions per weight, M = 1 (M = 16 for
# _m16): today's binary (nvcc 13.0, sm_90a), as walked. tests/test_sass_walk.py holds them within ±3%;
# tests/test_cuda_compile_tier.py holds them to SPEC §5's budgets.
WALKED = {
    "b2_g0": (1.53, 1.32),
    "b2_g0_m16": (1.83, 1.54),
    "b2_g128": (1.70, 1.54),
    "b2_g128_m16": (2.08, 1.84),
    "b3_g0": (2.18, 1.97),
    "b3_g0_m16": (2.52, 2.20),
    "b3_g128": (2.36, 2.19),
    "b3_g128_m16": (2.75, 2.49),
    "b4_g0": (1.66, 1.42),
    "b4_g0_m16": (1.94, 1.67),
    "b4_g128": (1.82, 1.61),
    "b4_g128_m16": (2.17, 1.92),
    "b4_g32": (2.40, 2.18),
    "b4_g32_m16": (2.95, 2.70),
    "b4_g64": (2.02, 1.81),
    "b4_g64_m16": (2.42, 2.18),
    "bf16_b2_g0": (1.65, 1.44),
    "bf16_b2_g0_m16": (1.94, 1.66),
    "bf16_b2_g128": (1.83, 1.67),
    "bf16_b2_g128_m16": (2.21, 1.97),
    "bf16_b3_g0": (2.46, 2.25),
    "bf16_b3_g0_m16": (2.78, 2.48),
    "bf16_b3_g128": (2.64, 2.47),
    "bf16_b3_g128_m16": (3.04, 2.78),
    "bf16_b4_g0": (1.91, 1.67),
    "bf16_b4_g0_m16": (2.19, 1.92),
    "bf16_b4_g128": (2.07, 1.86),
    "bf16_b4_g128_m16": (2.43, 2.19),
    "bf16_b4_g32": (2.65, 2.43),
    "bf16_b4_g32_m16": (3.20, 2.95),
    "bf16_b4_g64": (2.26, 2.05),
    "bf16_b4_g64_m16": (2.67, 2.43),
}


@dataclass(frozen=True)
class Launch:
    """What cuda_kernel.launch_plan launches for this kernel and shape: one CTA per 16 columns, ``slices`` warps
    each summing ``k_slice`` of K (the last what is left)."""

    bits: int
    group: int
    M: int
    K: int
    N: int

    @property
    def vec_k(self) -> int:
        from maca_kernels.ops.quant_matmul.mma_layout import VEC_K

        return VEC_K[self.bits]

    @functools.cached_property
    def slicing(self) -> tuple[int, int]:
        from maca_kernels.ops.quant_matmul.cuda_kernel import slicing
        from maca_kernels.ops.quant_matmul.mma_layout import MmaWeight

        w = MmaWeight(None, None, None, None, self.bits, self.group or self.K, self.K, self.N)
        return slicing(w, N_SMS)

    @property
    def slices(self) -> int:
        return self.slicing[0]

    @property
    def k_slice(self) -> int:
        return self.slicing[1]

    def k_range(self, warp: int) -> int:
        """K values warp ``warp`` sums."""
        return max(0, min(self.K, (warp + 1) * self.k_slice) - warp * self.k_slice)


def gemv_plan(fn: Function, launch: Launch, mt: int, warp: int) -> Plan:
    """The directions of warp ``warp`` of a CTA of this launch (gather = 0)."""
    per_load = (4 if launch.bits == 4 else 8) * mt  # HMMA per 128-bit load
    hmma = launch.k_range(warp) // launch.vec_k * per_load
    sliced = launch.slices > 1
    trip = 8 if mt == 1 else 4  # loads per trip around the ring (Prefetch<MT>)
    n_vec = launch.k_range(warp) // launch.vec_k
    odd_trip = n_vec % (2 * trip) >= trip  # after the two-trip loop, one whole trip is left

    def override(b):
        region = b.skipped
        has = lambda *ops: any(k.startswith(ops) for k in region)  # noqa: E731
        if b.kind == "forward" and has("STS.128") and not has("BAR"):  # gather's x staging (or a gather path)
            return True
        if b.kind == "forward" and has("BAR") and not has("HMMA", "STS", "LDS"):  # gather's barrier
            return True
        if b.kind == "forward" and has("BAR") and not has("HMMA"):  # the slices' sums
            return not sliced
        if b.kind == "exit":  # slices past the first, once their sums are in shared memory
            return warp > 0
        if b.kind == "forward" and has("STS") and not has("LDS", "HMMA", "BAR"):  # a slice's sums stored
            return warp == 0
        if b.sides is not None:  # gather or not: the side without the staging's 128-bit shared stores
            staging = [any(k.startswith("STS.128") for k in side) for side in b.sides]
            if staging[0] != staging[1]:
                return staging[0]
            refills = [any(k.startswith("LDG.E.128") for k in side) for side in b.sides]
            if all(any(k.startswith("HMMA") for k in side) for side in b.sides) and refills[0] != refills[1]:
                return odd_trip == refills[1]  # an odd trip (refilling the ring) and the tail, or the tail alone
        if b.kind == "forward" and has("STG") and not has("HMMA", "LDG", "STS", "LDS"):
            # a store of y the compiler branched over rather than predicated: row 8 (mt - 1) + 2t + 1 of the
            # last tile; no lane of the warp stores it iff M <= 8 (mt - 1) + 1
            return launch.M <= 8 * (mt - 1) + 1
        return None

    # the slices' sums: slice 0 reads the other slices' mt float4s
    return Plan([Budget("HMMA", hmma), Budget("LDS", (launch.slices - 1) * mt if warp == 0 else 0)], override)


@dataclass
class Figures:
    """Thread-instructions per weight (warp instructions x 32 / the weights the warps process)."""

    launch: Launch
    loop: float  # warp 0's main loop (whole trips around the load ring), per weight of the loads it ran
    warps: list[float]  # each warp of a CTA, per weight of its own range of K
    spills: int  # LDL + STL executed, all warps of a CTA
    prologue: int  # warp 0: instructions before the main loop
    epilogue: int  # warp 0: after it (remainder steps, the slices' sums, stores)
    total: int  # warp instructions of a CTA

    @property
    def cta(self) -> float:
        """The whole kernel: a CTA's thread-instructions per weight (16 x K)."""
        return self.total * 32 / (16 * self.launch.K)


def main_loop(fn: Function, tr) -> object:
    """The loop of whole trips around the load ring on the walked path: of the loops whose HMMA's executed, the one
    executing the most of them, the innermost on a tie."""
    def hmma(lp):
        return tr.count(lp.start, lp.end + 1, where=lambda ins: ins.base == "HMMA")

    return max((lp for lp in fn.loops if lp.ops["HMMA"]), key=lambda lp: (hmma(lp), lp.depth))


def gemv_figures(fn: Function, launch: Launch, mt: int) -> Figures:
    warps, spills, total = [], 0, 0
    for warp in range(launch.slices):
        tr = walk(fn, gemv_plan(fn, launch, mt, warp))
        k = launch.k_range(warp)
        want = k // launch.vec_k * (4 if launch.bits == 4 else 8) * mt
        assert tr.ops["HMMA"] == want, f"warp {warp} walked {tr.ops['HMMA']} HMMA, its range needs {want}"
        warps.append(tr.count() * 32 / (16 * k))
        spills += tr.ops["LDL"] + tr.ops["STL"]
        total += tr.count()
        if warp == 0:
            loop = main_loop(fn, tr)
            hmma = tr.count(loop.start, loop.end + 1, where=lambda ins: ins.base == "HMMA")
            loop_k = hmma // ((4 if launch.bits == 4 else 8) * mt) * launch.vec_k  # k of the loads it ran
            loop_fig = tr.in_loop(loop) * 32 / (16 * loop_k) if loop_k else float("nan")
            prologue, epilogue = tr.count(0, loop.start), tr.count(loop.end + 1)
    return Figures(launch, loop_fig, warps, spills, prologue, epilogue, total)


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
    for name, regs in re.findall(r"Compiling entry function '(\w+)'.*?Used (\d+) registers", log, re.S):
        resources[name] = (int(regs), 0)
    return {k: Function(v) for k, v in funcs.items()}, resources


def variant_launch(name: str, shape: str) -> Launch:
    """The launch of kernel ``name`` at ``shape`` for M = 1 (M = 16 for the _m16 kernels)."""
    bits = int(re.search(r"_b(\d)_", name).group(1))
    group = int(re.search(r"_g(\d+)", name).group(1))
    K, N = SHAPES[shape]
    return Launch(bits, group, 16 if name.endswith("_m16") else 1, K, N)


def figures(name: str, shape: str) -> Figures:
    """The executed figures of kernel ``name`` at ``shape``."""
    fns, _ = walked_gemv()
    return gemv_figures(fns[name], variant_launch(name, shape), 2 if name.endswith("_m16") else 1)


def table() -> str:
    fns, resources = walked_gemv()
    rows = ["| kernel | shape | registers | warps x K each | main loop | each warp | whole kernel | LDL+STL |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in sorted(n for n in fns if n.startswith("maca_gemv_mma")):
        for shape in SHAPES:
            f = figures(name, shape)
            rows.append(f"| {name.removeprefix('maca_gemv_mma_')} | {shape} | {resources[name][0]} | "
                        f"{f.launch.slices} x {f.launch.k_slice} | {f.loop:.2f} | "
                        f"{' / '.join(f'{w:.2f}' for w in f.warps)} | {f.cta:.2f} | {f.spills} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
