"""The SASS walker (tests/sass_walk.py) on hand-made SASS with known counts, and on the CUDA GEMV's real binary:
the instructions each warp executes at the launcher's slicing for SPEC §5's shapes (K x N = 4096 x 4096 and
8192 x 28672), per weight (issue 20: count the path that executes).

The first part runs anywhere; the second (``compile`` marker, as tests/test_cuda_compile_tier.py) needs nvcc.
Its figures are today's executed counts, held within ±3% as a regression check of the walk; the SPEC budgets
are tests/test_cuda_compile_tier.py's.

``python tests/gemv_sass.py`` prints the table of every variant at both shapes.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemv_sass import SHAPES, WALKED, figures, walked_gemv  # noqa: E402
from sass_walk import Budget, Function, Plan, Undecided, walk  # noqa: E402


def _sass(body: str) -> list[str]:
    """nvdisasm-like lines from 'LABEL:' / 'instruction' lines (addresses added)."""
    out, addr = [], 0
    for line in body.strip().splitlines():
        line = line.strip()
        if line.endswith(":"):
            out.append(line)
        else:
            out.append(f"        /*{addr:04x}*/                   {line} ;")
            out.append(f"                                                  /* 0x{addr:032x} */")
            addr += 16
    return out


STRAIGHT = _sass("""
MOV R0, 0x1
IADD3 R1, R0, R0, RZ
HMMA.16816.F32 R4, R8, R12, R4
EXIT
""")


def test_straight_line():
    fn = Function(STRAIGHT)
    tr = walk(fn, Plan([]))
    assert len(fn.instrs) == 4 and not fn.loops
    assert tr.count() == 4 and tr.ops["HMMA"] == 1


# a counted loop, rotated as nvcc does: a guard that skips it, a body with a bottom test
LOOP = _sass("""
S2R R0, SR_TID.X
ISETP.GE.AND P0, PT, R0, c[0x0][0x210], PT
@P0 BRA `(.L_x_1)
.L_x_0:
LDG.E R2, desc[UR4][R4.64]
HMMA.16816.F32 R8, R12, R16, R8
HMMA.16816.F32 R8, R12, R16, R8
IADD3 R0, R0, 0x1, RZ
ISETP.LT.AND P0, PT, R0, c[0x0][0x210], PT
@P0 BRA `(.L_x_0)
.L_x_1:
STG.E desc[UR4][R6.64], R8
EXIT
""")


@pytest.mark.parametrize("trips", [0, 1, 5])
def test_loop_with_known_trip_count(trips):
    fn = Function(LOOP)
    assert len(fn.loops) == 1 and fn.loops[0].ops["HMMA"] == 2
    tr = walk(fn, Plan([Budget("HMMA", 2 * trips)]))  # two HMMA per pass
    assert tr.count() == 3 + 6 * trips + 2
    assert tr.ops["HMMA"] == 2 * trips
    assert tr.hits[3] == trips  # the body's first instruction


def test_loop_that_never_runs_is_not_counted():
    """The unroll(2) shape of the GEMV: a two-trip loop, then one trip, then single steps; 1 trip of work."""
    fn = Function(_sass("""
ISETP.GE.AND P0, PT, R0, 0x2, PT
@!P0 BRA `(.L_x_1)
.L_x_0:
HMMA.16816.F32 R8, R12, R16, R8
HMMA.16816.F32 R8, R12, R16, R8
HMMA.16816.F32 R8, R12, R16, R8
HMMA.16816.F32 R8, R12, R16, R8
@P0 BRA `(.L_x_0)
.L_x_1:
@P1 BRA `(.L_x_2)
HMMA.16816.F32 R8, R12, R16, R8
HMMA.16816.F32 R8, R12, R16, R8
.L_x_2:
@P2 BRA `(.L_x_3)
HMMA.16816.F32 R8, R12, R16, R8
.L_x_3:
EXIT
"""))
    for work, expect in [(2, 2 + 1 + 2 + 1 + 1), (3, 2 + 1 + 2 + 1 + 1 + 1), (4, 2 + 5 + 1 + 1 + 1),
                         (9, 2 + 10 + 1 + 1 + 1 + 1)]:
        tr = walk(fn, Plan([Budget("HMMA", work)]))
        assert tr.ops["HMMA"] == work, work
        assert tr.count() == expect, work
    assert walk(fn, Plan([Budget("HMMA", 2)])).hits[2] == 0  # the long loop: never entered at one trip


NESTED = _sass("""
MOV R0, RZ
.L_x_0:
MOV R1, RZ
.L_x_1:
HMMA.16816.F32 R8, R12, R16, R8
IADD3 R1, R1, 0x1, RZ
@P1 BRA `(.L_x_1)
STS.128 [R2], R4
IADD3 R0, R0, 0x1, RZ
@P0 BRA `(.L_x_0)
EXIT
""")


def test_nested_loops():
    fn = Function(NESTED)
    outer, inner = fn.loops
    assert inner.parent is outer and outer.children == [inner] and inner.depth == 1
    # 3 outer passes of 4 inner ones: the inner budget restarts at each pass of the outer header
    plan = Plan([Budget("HMMA", 12), Budget("HMMA", 4, lambda f: f.loops[0]), Budget("STS.128", 3)])
    tr = walk(fn, plan)
    assert tr.ops["HMMA"] == 12 and tr.ops["STS"] == 3
    assert tr.count() == 1 + 3 * (1 + 4 * 3 + 3) + 1
    assert tr.in_loop(inner) == 36


def test_predicated_branch_and_exit_follow_the_plan():
    fn = Function(_sass("""
ISETP.NE.AND P0, PT, R0, RZ, PT
@P0 BRA `(.L_x_0)
ATOMG.E.ADD.STRONG.GPU PT, R2, desc[UR4][R2.64], R3
.L_x_0:
BAR.SYNC.DEFER_BLOCKING 0x0
@!P1 EXIT
@P2 FADD R0, R0, R1
STL [R1], R0
EXIT
"""))
    def plan(warp, last):
        return Plan([], lambda b: (warp != 0) if b.skipped["ATOMG.E.ADD.STRONG.GPU"] else
                    (not last) if b.kind == "exit" else None)

    assert walk(fn, plan(0, True)).count() == 8  # predicated-off FADD still issues
    assert walk(fn, plan(1, True)).count() == 7
    assert walk(fn, plan(1, False)).count() == 4
    assert walk(fn, plan(0, True)).ops["STL"] == 1
    with pytest.raises(Undecided):
        walk(fn, Plan([]))


def test_if_else_needs_a_side():
    fn = Function(_sass("""
@P0 BRA `(.L_x_0)
F2FP.F16.F32.PACK_AB R1, RZ, R1
STG.E.U16 desc[UR4][R2.64], R1
BRA `(.L_x_1)
.L_x_0:
STG.E desc[UR4][R2.64], R1
.L_x_1:
EXIT
"""))
    with pytest.raises(Undecided):
        walk(fn, Plan([]))
    to_partial = walk(fn, Plan([], lambda b: any(k.startswith("F2FP") for k in b.sides[0])))  # y falls through
    assert to_partial.count() == 3 and to_partial.hits[4] == 1
    to_y = walk(fn, Plan([], lambda b: False))
    assert to_y.count() == 5 and to_y.hits[4] == 0


# ---------------------------------------------------------------- the CUDA GEMV's binary (needs nvcc)

@pytest.fixture(scope="module")
def gemv():
    from test_cuda_compile_tier import NVCC

    if NVCC is None:
        pytest.skip("nvcc not found")
    return walked_gemv()


@pytest.mark.compile
@pytest.mark.parametrize("name", ["maca_gemv_mma_b4_g128", "maca_gemv_mma_b3_g128", "maca_gemv_mma_b2_g0_m16"])
def test_the_walk_follows_the_kernels_structure(gemv, name):
    """On today's binary the walk runs what the source says for each warp's range: every HMMA of its loads, the
    trip loop (two trips per pass) as often as whole pairs of trips fit, an odd trip and the remainder only where
    the range has them, the ring filled once and refilled by each whole trip, the slices' sums only with several
    slices (LDS in slice 0, STS in the others), and no gather staging on the sorted path."""
    from gemv_sass import Launch, gemv_plan, main_loop

    fns, _ = gemv
    fn = fns[name]
    bits, group = (int(v) for v in re.search(r"_b(\d)_g(\d+)", name).groups())
    mt = 2 if name.endswith("_m16") else 1
    vec_k, trip = (64, 8) if bits == 4 else (128, 8 if mt == 1 else 4)
    for K, N in ((4096, 4096), (8192, 28672), (2176, 1024)):
        launch = Launch(bits, group, 16 if mt == 2 else 1, K, N)
        for warp in range(launch.slices):
            tr = walk(fn, gemv_plan(fn, launch, mt, warp))
            loads = launch.k_range(warp) // vec_k
            assert tr.ops["HMMA"] == loads * (4 if bits == 4 else 8) * mt
            loop = main_loop(fn, tr)
            pairs, odd = loads // (2 * trip), loads % (2 * trip) >= trip
            assert tr.hits[loop.end] == pairs or pairs == 0, (K, warp, tr.hits[loop.end], pairs)
            # the ring: filled once, refilled by every whole trip (an odd last one re-reads its own loads, which
            # ptxas may see through)
            refills = tr.count(where=lambda ins: ins.opcode.startswith("LDG.E.128"))
            assert trip * (1 + 2 * pairs) <= refills <= trip * (1 + 2 * pairs + odd), (K, warp, refills, pairs, odd)
            # (slice 0 issues the predicated-off stores too)
            assert tr.ops["STS"] == (0 if launch.slices == 1 else mt), (K, warp, launch.slices)
            assert tr.ops["LDS"] == ((launch.slices - 1) * mt if warp == 0 else 0)


@pytest.mark.compile
@pytest.mark.parametrize("variant", sorted(WALKED))
def test_executed_figures_regression(gemv, variant):
    """Today's executed figures for every variant at both shapes, within ±3% (not the SPEC budgets)."""
    for shape, cta in zip(SHAPES, WALKED[variant], strict=True):
        f = figures(f"maca_gemv_mma_{variant}", shape)
        assert f.cta == pytest.approx(cta, rel=0.03), (shape, f.cta)


def test_a_branch_is_described_once_per_walk():
    """The walk builds each branch's description once and asks the plan with the same one on every pass."""
    fn = Function(LOOP)
    seen = []

    def override(b):
        seen.append(b)
        return None

    tr = walk(fn, Plan([Budget("HMMA", 2 * 5)], override))
    assert tr.count() == 3 + 6 * 5 + 2
    backs = [b for b in seen if b.kind == "back"]
    assert len(backs) == 5 and all(b is backs[0] for b in backs)
