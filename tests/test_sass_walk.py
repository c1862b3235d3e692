"""The SASS walker (tests/sass_walk.py) on hand-made SASS with known counts, and on the CUDA GEMV's real binary:
the instructions each warp role executes at the launcher's split and tile choices for SPEC §5's shapes
(K x N = 4096 x 4096 and 8192 x 28672), per weight (issue 20: count the path that executes).

The first part runs anywhere; the second (``compile`` marker, as tests/test_cuda_compile_tier.py) needs nvcc.
Its figures are today's executed counts, held within ±3% as a regression check of the walk; the SPEC budgets
(int4 ≤ 3.0, int3 ≤ 2.5, int2 ≤ 1.8) are a separate matter (issue 20, part 2).

``python tests/gemv_sass.py`` prints the table of every variant at both shapes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemv_sass import SHAPES, WALKED, figures, gemv_plan, variant_launch, walked_gemv  # noqa: E402
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
def test_issue_20_figures_for_todays_binary(gemv):
    """Issue 20's hand count: per chunk int4 2.01-2.28, int3 2.60-2.87, int2 2.00-2.27 (warps without / with x
    staging); at 4096² (one chunk per CTA, 8 splits) about 2.8 / 3.4 / 2.8 for the whole kernel, ~84
    instructions of prologue and ~80 of epilogue per warp; the two-trip loop never runs for int3 / int2; int2
    spills 5 LDL + 3 STL per chunk on the executed path."""
    fns, _ = gemv
    for bits, chunk, whole in [(4, (2.01, 2.28), 2.8), (3, (2.60, 2.87), 3.4), (2, (2.00, 2.27), 2.8)]:
        name = f"maca_gemv_mma_b{bits}_g128"
        f = figures(name, "4096x4096")
        assert f.launch.k_split == 512 and f.launch.splits == 8 and len(f.launch.chunks()) == 1
        assert min(f.per_chunk) == pytest.approx(chunk[0], rel=0.03) and max(f.per_chunk) == pytest.approx(chunk[1],
                                                                                                      rel=0.03)
        assert f.cta == pytest.approx(whole, rel=0.03), f
        assert 80 <= f.prologue <= 100 and 75 <= f.epilogue[0] <= 95, f  # the non-reducing CTA's epilogue
        # the longest HMMA loop (what test_cuda_compile_tier counts) runs at int4 only
        fn = fns[name]
        longest = max((lp for lp in fn.loops if lp.ops["HMMA"] and not lp.children), key=lambda lp: lp.end - lp.start)
        for shape in SHAPES:
            tr = walk(fn, gemv_plan(fn, variant_launch(name, shape, gemv[1][name]), 1, 0, False))
            assert (tr.hits[longest.start] > 0) == (bits == 4), (name, shape)
    # int2 g128: 16 chunks at 8192 x 28672: one STL in the prologue, 5 LDL + 3 STL per chunk (the LDL in the x
    # staging loop only for the warps that stage)
    fn = fns["maca_gemv_mma_b2_g128"]
    launch = variant_launch("maca_gemv_mma_b2_g128", "8192x28672", gemv[1]["maca_gemv_mma_b2_g128"])
    for warp, ldl in [(0, 5), (3, 4)]:
        ops = walk(fn, gemv_plan(fn, launch, 1, warp, False)).ops
        assert (ops["LDL"], ops["STL"]) == (16 * ldl, 1 + 16 * 3), (warp, ops["LDL"], ops["STL"])


@pytest.mark.compile
@pytest.mark.parametrize("variant", sorted(WALKED))
def test_executed_figures_regression(gemv, variant):
    """Today's executed figures for every variant at both shapes, within ±3% (not the SPEC budgets)."""
    for shape, (lo, hi, cta) in zip(SHAPES, WALKED[variant], strict=True):
        f = figures(f"maca_gemv_mma_{variant}", shape)
        got = (min(f.per_chunk), max(f.per_chunk), f.cta)
        assert got == pytest.approx((lo, hi, cta), rel=0.03), (shape, got)


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
