"""The Triton GEMV's configs as they execute (issue 20: count the path that executes): every GEMV variant the
compile tier builds at M = 1 (int2/int3/int4; group 128, act-order, the mma layout at group 128 and int4 group
32; split-K atomics and the deterministic store; K x N = 4096 x 4096 and 8192 x 28672) walked on its sm_90 SASS
at the launcher's grid and K-loop trip counts (tests/triton_gemv_sass.py says how each branch is decided).

Held: today's executed thread-instructions per weight for the whole program (prologue, K loop, epilogue with
the atomic add or store) within ±3% of ``triton_gemv_sass.WALKED`` (a regression check of the walk, not a
budget), and no LDL / STL on the executed path (none today).

One subprocess (without TRITON_INTERPRET) compiles and walks the 110 distinct binaries of the 220 variants; ~50 s
on the shared 2-core machine with triton's cache warm (the compile tier fills it; cold, compiles add a few
minutes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
from triton_gemv_sass import SHAPES, SPILLING, WALKED  # noqa: E402

pytestmark = pytest.mark.compile


@pytest.fixture(scope="module")
def walked(tmp_path_factory):
    try:
        import triton.backends.nvidia  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(90)
    except Exception as exc:  # no CUDA backend or ptxas in this triton: the tier cannot compile here
        pytest.skip(f"triton cannot compile for sm_90 here: {exc}")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MACA_KERNELS_TUNE")}
    root = os.path.dirname(HERE)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    out = tmp_path_factory.mktemp("triton_gemv") / "walk.json"
    res = subprocess.run([sys.executable, os.path.join(HERE, "triton_gemv_sass.py"), "--json", str(out)], env=env,
                         cwd=root, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-4000:]
    with open(out) as f:
        rows = json.load(f)["rows"]
    return {(r["name"], r["shape"]): r for r in rows}


def test_every_variant_walked(walked):
    assert {n for n, _ in walked} == set(WALKED), "the tier's GEMV variants and the regression table differ"
    assert {s for _, s in walked} == set(SHAPES)


@pytest.mark.parametrize("name", sorted(WALKED))
def test_executed_per_weight(walked, name):
    for shape, today in zip(SHAPES, WALKED[name], strict=True):
        r = walked[(name, shape)]
        assert r["per_weight"] == pytest.approx(today, rel=0.03), (shape, r)
        # the whole program costs at least the main loop the tier counts, and the walk's loop is that loop
        assert r["per_weight"] >= r["tier_per_weight"]
        assert r["loop_per_trip"] == r["main_loop_sass"], r


@pytest.mark.parametrize("name", sorted(WALKED))
def test_no_local_memory_on_the_executed_path(walked, name):
    for k, shape in enumerate(SHAPES):
        r = walked[(name, shape)]
        assert (r["ldl"], r["stl"]) == (SPILLING[name][k] if name in SPILLING else (0, 0)), (shape, r)
