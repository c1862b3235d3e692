"""The Triton GEMV (quant_matmul's ``_quant_matmul_kernel`` at M = 1) as it executes: the compile tier's GEMV
variants (tests/compile_tier.py: int2/int3/int4, group 128 sorted and act-order, the mma layout at group 128 and
int4 group 32; split-K with atomics and the deterministic SPLIT_K = 1 store; K x N = 4096 x 4096 and
8192 x 28672) are compiled for sm_90 as triton's JIT would, disassembled (nvdisasm, as the tier does), and the
SASS walker (sass_walk.py) follows each warp of a program along the path that the launch arguments take.

What the launcher launches (``triton_kernel._launch``): grid ``(1, cdiv(N, BLOCK_N), SPLIT_K)``; program ``pid_k``
runs the K loop ``range(k_begin, k_end, BLOCK_K)`` with ``k_span = cdiv(cdiv(K, BLOCK_K), SPLIT_K) · BLOCK_K``,
``k_begin = pid_k · k_span``, ``k_end = min(K, k_begin + k_span)``. At both shapes every split is whole tiles and
N is a multiple of every BLOCK_N, so all programs run the same trip count with no masked column or K tail (the
walk asserts it). The branches of the SASS, decided per warp:

- the guard that skips the K loop when ``k_begin >= k_end``: taken iff the program's trip count is 0 (act-order
  and int4 g32 mma variants lay it out as if / else, the loop on the branch's target side: taken iff trips > 0);
- the K loop's back edge: taken trips − 1 times;
- the conditional EXIT before the epilogue's atomic add / store: the threads that hold no column of their own
  leave (BLOCK_N = 64 on 128 threads: ``tid < 64`` stores, warps 2 and 3 exit; wider tiles: no warp exits);
- inside the loop of a few variants (int3 act-order 1x64x64, int4 g32 mma det), a ladder of forward branches
  over ``STS`` of a cross-warp reduction, predicated on ``lane != 0``: lane 0 falls through every one, so each
  warp issues the fall-through path (the other lanes' path is a subset of it; counted once, a lower bound if
  the hardware issues the two lane groups separately).

Nothing else branches (the walk raises ``Undecided`` otherwise). Figures are thread-instructions per weight:
the program's four warps' executed instructions (prologue, K loop, epilogue with atomics / stores) x 32 over
the BLOCK_N x (k_end − k_begin) weights it processes, beside the tier's main-loop-only figure (``_aot.
main_loop_sass``: the largest innermost loop, x 32 x num_warps / (BLOCK_N x BLOCK_K)).

Must run without TRITON_INTERPRET (the compiler needs real JIT functions): ``python tests/triton_gemv_sass.py``
prints the table; ``--json FILE`` writes the rows (tests/test_triton_gemv_walk.py runs it so).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sass_walk import Branch, Function, Loop, Plan, walk  # noqa: E402

MODULE = "maca_kernels.ops.quant_matmul.triton_kernel"
NAME = re.compile(r"qmm_(mma_)?gemv_([234])b")
SHAPES = ("4096x4096", "8192x28672")

# variant name without its shape -> (4096x4096, 8192x28672): executed thread-instructions per weight, whole
# program (today's binaries: triton 3.6, sm_90), as walked. tests/test_triton_gemv_walk.py holds them within ±3%.
WALKED: dict[str, tuple[float, float]] = {
    "qmm_gemv_2b_1x128x32_k1_w4s2": (7.99, 7.98),
    "qmm_gemv_2b_1x128x32_k2_w4s2": (8.01, 7.99),
    "qmm_gemv_2b_1x128x32_k4_w4s2": (8.06, 8.01),
    "qmm_gemv_2b_1x128x32_k8_w4s2": (8.15, 8.06),
    "qmm_gemv_2b_1x128x64_k1_w4s2": (7.00, 6.99),
    "qmm_gemv_2b_1x128x64_k2_w4s2": (7.03, 7.00),
    "qmm_gemv_2b_1x128x64_k4_w4s2": (7.07, 7.03),
    "qmm_gemv_2b_1x128x64_k8_w4s2": (7.15, 7.07),
    "qmm_gemv_2b_1x256x32_k1_w4s2": (6.70, 6.69),
    "qmm_gemv_2b_1x256x32_k2_w4s2": (6.71, 6.70),
    "qmm_gemv_2b_1x256x32_k4_w4s2": (6.74, 6.71),
    "qmm_gemv_2b_1x256x32_k8_w4s2": (6.79, 6.74),
    "qmm_gemv_2b_1x64x64_k1_w4s2": (11.82, 11.80),
    "qmm_gemv_2b_1x64x64_k2_w4s2": (11.86, 11.82),
    "qmm_gemv_2b_1x64x64_k4_w4s2": (11.94, 11.86),
    "qmm_gemv_2b_1x64x64_k8_w4s2": (12.09, 11.94),
    "qmm_gemv_2b_det_1x128x32_k1_w4s2": (7.99, 7.98),
    "qmm_gemv_2b_det_1x128x64_k1_w4s2": (7.00, 6.99),
    "qmm_gemv_2b_det_1x256x32_k1_w4s2": (6.70, 6.69),
    "qmm_gemv_2b_det_1x64x64_k1_w4s2": (11.82, 11.80),
    "qmm_gemv_2b_gidx_1x128x32_k1_w4s2": (27.47, 27.45),
    "qmm_gemv_2b_gidx_1x128x32_k2_w4s2": (27.51, 27.47),
    "qmm_gemv_2b_gidx_1x128x32_k4_w4s2": (27.58, 27.51),
    "qmm_gemv_2b_gidx_1x128x32_k8_w4s2": (27.73, 27.58),
    "qmm_gemv_2b_gidx_1x64x64_k1_w4s2": (30.93, 30.89),
    "qmm_gemv_2b_gidx_1x64x64_k2_w4s2": (31.01, 30.93),
    "qmm_gemv_2b_gidx_1x64x64_k4_w4s2": (31.18, 31.01),
    "qmm_gemv_2b_gidx_1x64x64_k8_w4s2": (31.52, 31.18),
    "qmm_gemv_2b_gidx_det_1x128x32_k1_w4s2": (27.54, 27.52),
    "qmm_gemv_2b_gidx_det_1x64x64_k1_w4s2": (30.58, 30.54),
    "qmm_gemv_3b_1x128x32_k1_w4s2": (8.58, 8.57),
    "qmm_gemv_3b_1x128x32_k2_w4s2": (8.60, 8.58),
    "qmm_gemv_3b_1x128x32_k4_w4s2": (8.64, 8.60),
    "qmm_gemv_3b_1x128x32_k8_w4s2": (8.71, 8.64),
    "qmm_gemv_3b_1x128x64_k1_w4s2": (8.01, 8.00),
    "qmm_gemv_3b_1x128x64_k2_w4s2": (8.03, 8.01),
    "qmm_gemv_3b_1x128x64_k4_w4s2": (8.08, 8.03),
    "qmm_gemv_3b_1x128x64_k8_w4s2": (8.18, 8.08),
    "qmm_gemv_3b_1x256x32_k1_w4s2": (7.46, 7.46),
    "qmm_gemv_3b_1x256x32_k2_w4s2": (7.48, 7.46),
    "qmm_gemv_3b_1x256x32_k4_w4s2": (7.50, 7.48),
    "qmm_gemv_3b_1x256x32_k8_w4s2": (7.54, 7.50),
    "qmm_gemv_3b_1x64x64_k1_w4s2": (13.25, 13.22),
    "qmm_gemv_3b_1x64x64_k2_w4s2": (13.31, 13.25),
    "qmm_gemv_3b_1x64x64_k4_w4s2": (13.44, 13.31),
    "qmm_gemv_3b_1x64x64_k8_w4s2": (13.69, 13.44),
    "qmm_gemv_3b_det_1x128x32_k1_w4s2": (8.61, 8.60),
    "qmm_gemv_3b_det_1x128x64_k1_w4s2": (8.01, 8.00),
    "qmm_gemv_3b_det_1x256x32_k1_w4s2": (7.46, 7.46),
    "qmm_gemv_3b_det_1x64x64_k1_w4s2": (13.25, 13.22),
    "qmm_gemv_3b_gidx_1x128x32_k1_w4s2": (29.33, 29.31),
    "qmm_gemv_3b_gidx_1x128x32_k2_w4s2": (29.38, 29.33),
    "qmm_gemv_3b_gidx_1x128x32_k4_w4s2": (29.48, 29.38),
    "qmm_gemv_3b_gidx_1x128x32_k8_w4s2": (29.69, 29.48),
    "qmm_gemv_3b_gidx_1x64x64_k1_w4s2": (39.97, 39.89),
    "qmm_gemv_3b_gidx_1x64x64_k2_w4s2": (40.13, 39.97),
    "qmm_gemv_3b_gidx_1x64x64_k4_w4s2": (40.44, 40.13),
    "qmm_gemv_3b_gidx_1x64x64_k8_w4s2": (41.07, 40.44),
    "qmm_gemv_3b_gidx_det_1x128x32_k1_w4s2": (29.46, 29.43),
    "qmm_gemv_3b_gidx_det_1x64x64_k1_w4s2": (40.01, 39.92),
    "qmm_gemv_4b_1x128x32_k1_w4s2": (7.80, 7.79),
    "qmm_gemv_4b_1x128x32_k2_w4s2": (7.82, 7.80),
    "qmm_gemv_4b_1x128x32_k4_w4s2": (7.87, 7.82),
    "qmm_gemv_4b_1x128x32_k8_w4s2": (7.95, 7.87),
    "qmm_gemv_4b_1x128x64_k1_w4s2": (7.14, 7.13),
    "qmm_gemv_4b_1x128x64_k2_w4s2": (7.17, 7.14),
    "qmm_gemv_4b_1x128x64_k4_w4s2": (7.21, 7.17),
    "qmm_gemv_4b_1x128x64_k8_w4s2": (7.29, 7.21),
    "qmm_gemv_4b_1x256x32_k1_w4s2": (6.86, 6.85),
    "qmm_gemv_4b_1x256x32_k2_w4s2": (6.87, 6.86),
    "qmm_gemv_4b_1x256x32_k4_w4s2": (6.89, 6.87),
    "qmm_gemv_4b_1x256x32_k8_w4s2": (6.94, 6.89),
    "qmm_gemv_4b_1x64x64_k1_w4s2": (11.57, 11.55),
    "qmm_gemv_4b_1x64x64_k2_w4s2": (11.61, 11.57),
    "qmm_gemv_4b_1x64x64_k4_w4s2": (11.70, 11.61),
    "qmm_gemv_4b_1x64x64_k8_w4s2": (11.86, 11.70),
    "qmm_gemv_4b_det_1x128x32_k1_w4s2": (7.80, 7.79),
    "qmm_gemv_4b_det_1x128x64_k1_w4s2": (7.14, 7.13),
    "qmm_gemv_4b_det_1x256x32_k1_w4s2": (6.86, 6.85),
    "qmm_gemv_4b_det_1x64x64_k1_w4s2": (11.57, 11.55),
    "qmm_gemv_4b_gidx_1x128x32_k1_w4s2": (27.34, 27.33),
    "qmm_gemv_4b_gidx_1x128x32_k2_w4s2": (27.38, 27.35),
    "qmm_gemv_4b_gidx_1x128x32_k4_w4s2": (27.45, 27.38),
    "qmm_gemv_4b_gidx_1x128x32_k8_w4s2": (27.58, 27.45),
    "qmm_gemv_4b_gidx_1x64x64_k1_w4s2": (29.76, 29.69),
    "qmm_gemv_4b_gidx_1x64x64_k2_w4s2": (29.89, 29.76),
    "qmm_gemv_4b_gidx_1x64x64_k4_w4s2": (30.16, 29.89),
    "qmm_gemv_4b_gidx_1x64x64_k8_w4s2": (30.70, 30.16),
    "qmm_gemv_4b_gidx_det_1x128x32_k1_w4s2": (27.41, 27.39),
    "qmm_gemv_4b_gidx_det_1x64x64_k1_w4s2": (29.83, 29.76),
    "qmm_mma_gemv_2b_g128_1x64x128_k1_w4s2": (7.43, 7.39),
    "qmm_mma_gemv_2b_g128_1x64x128_k4_w4s2": (7.64, 7.50),
    "qmm_mma_gemv_2b_g128_1x64x128_k8_w4s2": (7.91, 7.64),
    "qmm_mma_gemv_2b_g128_det_1x64x128_k1_w4s2": (7.46, 7.42),
    "qmm_mma_gemv_3b_g128_1x64x128_k1_w4s2": (10.77, 10.73),
    "qmm_mma_gemv_3b_g128_1x64x128_k4_w4s2": (11.02, 10.85),
    "qmm_mma_gemv_3b_g128_1x64x128_k8_w4s2": (11.34, 11.02),
    "qmm_mma_gemv_3b_g128_det_1x64x128_k1_w4s2": (10.77, 10.73),
    "qmm_mma_gemv_4b_g128_1x128x64_k1_w4s2": (9.36, 9.34),
    "qmm_mma_gemv_4b_g128_1x128x64_k4_w4s2": (9.44, 9.38),
    "qmm_mma_gemv_4b_g128_1x128x64_k8_w4s2": (9.56, 9.44),
    "qmm_mma_gemv_4b_g128_1x64x128_k1_w4s2": (8.05, 8.01),
    "qmm_mma_gemv_4b_g128_1x64x128_k4_w4s2": (8.25, 8.10),
    "qmm_mma_gemv_4b_g128_1x64x128_k8_w4s2": (8.57, 8.25),
    "qmm_mma_gemv_4b_g128_det_1x128x64_k1_w4s2": (9.36, 9.34),
    "qmm_mma_gemv_4b_g128_det_1x64x128_k1_w4s2": (8.02, 7.98),
    "qmm_mma_gemv_4b_g32_1x64x128_k1_w4s2": (18.84, 18.80),
    "qmm_mma_gemv_4b_g32_1x64x128_k4_w4s2": (19.12, 18.94),
    "qmm_mma_gemv_4b_g32_1x64x128_k8_w4s2": (19.49, 19.12),
    "qmm_mma_gemv_4b_g32_det_1x64x128_k1_w4s2": (18.87, 18.82),
}
# variants whose executed path has LDL / STL today: name without shape -> (LDL, STL) per program at each shape
SPILLING: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}


@dataclass(frozen=True)
class Launch:
    """One GEMV launch as ``triton_kernel._launch`` issues it at M = 1."""

    K: int
    N: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int

    @property
    def grid(self) -> tuple[int, int, int]:
        return (1, -(-self.N // self.block_n), self.split_k)

    def k_ranges(self) -> list[tuple[int, int]]:
        """(k_begin, k_end) of each pid_k, as the kernel computes them."""
        tiles = -(-self.K // self.block_k)
        span = -(-tiles // self.split_k) * self.block_k
        return [(p * span, min(self.K, p * span + span)) for p in range(self.split_k)]

    def trips(self, pid_k: int) -> int:
        a, b = self.k_ranges()[pid_k]
        return max(0, -(-(b - a) // self.block_k))


def k_loop(fn: Function) -> Loop:
    """The K loop: the largest loop whose back edge is conditional (the other loop is the trap ``BRA`` to itself
    after the last EXIT)."""
    loops = [lp for lp in fn.loops if fn.instrs[lp.end].pred is not None]
    assert loops, "no conditional loop"
    return max(loops, key=lambda lp: lp.end - lp.start)


def _lane_store_ladder(fn: Function, b: Branch) -> bool:
    """A forward branch over shared-memory stores only (the lane != 0 test around a reduction's STS)."""
    ops = {k.split(".")[0] for k in b.skipped}
    return "STS" in ops and ops <= {"STS", "IMAD", "IADD3", "MOV", "BRA", "BSYNC", "BREAK"}


def gemv_plan(fn: Function, launch: Launch, warp: int, trips: int) -> Plan:
    """The directions of warp ``warp`` of a program whose K loop runs ``trips`` times."""
    loop = k_loop(fn)
    passes = [0]
    owners = min(launch.block_n, 32 * launch.num_warps)  # threads with columns of their own

    def override(b: Branch) -> bool | None:
        i = b.instr.index
        if b.kind == "back" and b.loop is loop:
            passes[0] += 1
            return passes[0] < trips
        if b.kind == "forward" and b.region[0] <= loop.start and loop.end < b.region[1]:
            return trips == 0  # the zero-trip guard
        if b.kind == "forward" and b.sides is not None:  # if (no trip) {zeros; goto after the loop} else {loop}
            t = fn.target(b.instr)
            if t <= loop.start and loop.end < fn.target(fn.instrs[t - 1]):
                return trips > 0
        if b.kind == "exit" and i > loop.end:
            if owners < 32 * launch.num_warps:  # check that the predicate is the replication test tid < BLOCK_N
                window = " ".join(ins.text for ins in fn.instrs[max(0, i - 16): i])
                assert re.search(rf"ISETP\.LT\.U32\.AND P\d, PT, R\d+, 0x{owners:x},", window), window
            return 32 * warp >= owners
        if b.kind == "forward" and loop.start <= i <= loop.end and _lane_store_ladder(fn, b):
            return False  # lane 0 stores: the warp issues the fall-through path
        return None

    return Plan([], override)


@dataclass
class Row:
    name: str  # without the shape
    shape: str
    bits: int
    group: str  # 128, 32, or gidx (act-order, group 128)
    layout: str  # gptq or mma
    atomic: bool
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    trips: int  # K-loop trips per program (every pid_k the same at these shapes)
    registers: int
    spill_bytes: int
    main_loop_sass: int  # the tier's count: instructions of the largest innermost loop
    tier_per_weight: float  # main_loop_sass x 32 x warps / (BLOCK_N x BLOCK_K)
    loop_per_trip: int  # warp 0's executed K-loop instructions per trip
    prologue: int  # warp 0: before the K loop
    epilogue: list[int]  # per warp: after it
    executed: list[int]  # per warp: the whole program
    per_weight: float  # the program's warps' executed instructions x 32 / its weights
    ldl: int  # executed per program
    stl: int
    lane_branches: int  # lane-divergent branches decided on the path (fall-through counted)


def figures(fn: Function, launch: Launch) -> dict:
    loop = k_loop(fn)
    ranges = launch.k_ranges()
    trips = {launch.trips(p) for p in range(launch.split_k)}
    assert len(trips) == 1 and launch.N % launch.block_n == 0, (launch, ranges)  # no tails at these shapes
    (t,) = trips
    k_len = ranges[0][1] - ranges[0][0]
    assert k_len == t * launch.block_k
    executed, epilogue, ldl, stl, lane = [], [], 0, 0, 0
    owners = min(launch.block_n, 32 * launch.num_warps)
    walked = {}  # the warps' plans differ only in whether they own columns: one walk per kind
    for warp in range(launch.num_warps):
        if (32 * warp >= owners) in walked:
            tr = walked[32 * warp >= owners]
            executed.append(tr.count())
            epilogue.append(tr.count(loop.end + 1))
            ldl, stl = ldl + tr.ops["LDL"], stl + tr.ops["STL"]
            continue
        plan = gemv_plan(fn, launch, warp, t)
        seen = []
        inner = plan.override

        def spy(b, inner=inner, seen=seen):
            r = inner(b)
            if r is False and b.kind == "forward" and loop.start <= b.instr.index <= loop.end:
                seen.append(b.instr.index)
            return r

        tr = walked[32 * warp >= owners] = walk(fn, Plan([], spy))
        executed.append(tr.count())
        epilogue.append(tr.count(loop.end + 1))
        ops = tr.ops
        ldl, stl = ldl + ops["LDL"], stl + ops["STL"]
        if warp == 0:
            prologue = tr.count(0, loop.start)
            per_trip = tr.in_loop(loop) // max(t, 1)
            lane = len(seen)
    per_weight = sum(executed) * 32 / (launch.block_n * k_len)
    return dict(trips=t, loop_per_trip=per_trip, prologue=prologue, epilogue=epilogue, executed=executed,
                per_weight=round(per_weight, 3), ldl=ldl, stl=stl, lane_branches=lane)


def _nvdisasm() -> str:
    import triton.backends.nvidia as nv

    return os.path.join(os.path.dirname(nv.__file__), "bin", "nvdisasm")


def _variants() -> dict:
    from compile_tier import _variants as tier_variants

    return {n: v for n, v in tier_variants(MODULE).items() if NAME.match(n) and 90 in v.archs}


def _sass(name: str) -> tuple[list[str], int, int, int | None]:
    """(SASS lines of the kernel, registers, spill bytes, the tier's main-loop count) of variant ``name``."""
    from maca_kernels._aot import compile_variant, main_loop_sass

    k = compile_variant(_variants()[name], 90)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(k.cubin)
        sass = subprocess.run([_nvdisasm(), "-c", path], capture_output=True, text=True, check=True).stdout
    lines, inside = [], False
    for line in sass.splitlines():
        if re.match(r"\s*\.text\._quant_matmul_kernel:", line):
            inside = True
        elif inside and line.startswith("//-----"):
            break
        elif inside:
            lines.append(line)
    return lines, k.registers, k.spill_bytes, main_loop_sass(k.cubin)


def _rows_of(job: tuple[str, list[str]]) -> list[dict]:
    """Every variant of one compile (the shapes specialise identically: one binary, walked at each shape)."""
    first, names = job
    lines, regs, spills, main = _sass(first)
    fn = Function(lines)
    out = []
    for name in names:
        v = _variants()[name]
        kw, meta = v.kwargs, v.meta
        launch = Launch(meta["K"], meta["N"], kw["BLOCK_N"], kw["BLOCK_K"], kw["SPLIT_K"], kw["num_warps"])
        shape = f"{meta['K']}x{meta['N']}"
        group = "gidx" if kw["HAS_GIDX"] else str(kw["GROUP"])
        tier = main * 32 * launch.num_warps / (launch.block_n * launch.block_k)
        out.append(asdict(Row(name=name.removesuffix("_" + shape), shape=shape, bits=kw["BITS"], group=group,
                              layout="mma" if kw["MMA"] else "gptq", atomic=kw["ATOMIC"], block_n=launch.block_n,
                              block_k=launch.block_k, split_k=launch.split_k, num_warps=launch.num_warps,
                              registers=regs, spill_bytes=spills, main_loop_sass=main,
                              tier_per_weight=round(tier, 3), **figures(fn, launch))))
    return out


def rows(jobs: int = 2, only: str | None = None) -> list[dict]:
    from maca_kernels._aot import compile_key

    by_key: dict[str, list[str]] = {}
    for name, v in _variants().items():
        if not only or only in name:
            by_key.setdefault(compile_key(v, 90), []).append(name)
    work = [(names[0], names) for names in by_key.values()]
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            parts = list(pool.map(_rows_of, work))
    else:
        parts = [_rows_of(w) for w in work]
    return sorted((r for p in parts for r in p), key=lambda r: (r["name"], SHAPES.index(r["shape"])))


def table(rs: list[dict]) -> str:
    out = ["| variant | shape | trips | main loop (tier) | executed, whole program | prologue / loop per trip / "
           "epilogue (warp 0) | LDL / STL |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rs:
        out.append(f"| {r['name']} | {r['shape']} | {r['trips']} | {r['tier_per_weight']:.2f} | "
                   f"{r['per_weight']:.2f} | {r['prologue']} / {r['loop_per_trip']} / {r['epilogue'][0]} | "
                   f"{r['ldl']} / {r['stl']} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--only", help="only variants whose name contains this")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("triton_gemv_sass.py must run without TRITON_INTERPRET=1")
    t0 = time.perf_counter()
    rs = rows(args.jobs, args.only)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"wall_s": round(time.perf_counter() - t0, 1), "rows": rs}, f, indent=1)
    else:
        print(table(rs))


if __name__ == "__main__":
    main()
