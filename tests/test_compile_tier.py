"""Tier 2: every Triton kernel variant compiled for sm_90 and sm_80 on this CPU machine.

One subprocess (without TRITON_INTERPRET) compiles all variants in parallel; each variant is then its
own test. Variants are specialised by triton's own JIT rules from representative launch arguments (see
maca_kernels/_aot.py), so registers, spills and instructions are those of the GPU build. Beyond "it
compiles" this checks what decides speed and exactness on the GPU: no register spills on sm_90, shared
memory within the architecture's per-block limit, tensor-core instructions (wgmma on sm_90, mma.sync on
sm_80) with pipelined async loads for 16-bit inputs, and no tensor-core (tf32) instructions at all for
fp32 inputs.

The JSON summary (name, arch, registers, spills, shared bytes, specialisation, GEMV main-loop SASS size)
lands in pytest's base temp dir as compile_tier.json (``/tmp/pytest-of-$USER/pytest-current/``), and
also at $MACA_COMPILE_TIER_JSON when set.

Every autotune config of every schedule is compiled for sm_90 (sm_80: the SPLIT_K = 1 configs): 1116
(name, arch) variants, 626 distinct compiles (the second layer shape specialises identically). Measured
on the shared 2-core CPU machine: 4.5 min cold for 528 of them (empty triton cache, other jobs running; the
98 on the mma layout add ~1 min), ~5 s warm (triton's cache plus a per-compile-key result cache beside it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
from compile_tier import variant_ids  # noqa: E402

pytestmark = pytest.mark.compile

IDS = variant_ids()


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    # the tier compiles the full autotune lists, whatever the session's tuning mode
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MACA_KERNELS_TUNE")}
    root = os.path.dirname(HERE)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    out = tmp_path_factory.getbasetemp() / "compile_tier.json"
    res = subprocess.run([sys.executable, os.path.join(HERE, "compile_tier.py"), "--out", str(out)], env=env,
                         cwd=root, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-4000:]
    if os.environ.get("MACA_COMPILE_TIER_JSON"):
        shutil.copyfile(out, os.environ["MACA_COMPILE_TIER_JSON"])
    with open(out) as f:
        summary = json.load(f)
    return {(r["name"], r["arch"]): r for r in summary["results"]}


# (name prefix, tensor-core instruction expected on sm_90, on sm_80, software-pipelined loads expected)
EXPECTED = [
    ("gram_bf16", "wgmma", "mma_sync", True),
    ("gram_fp16", "wgmma", "mma_sync", True),
    ("gram_fp32", None, None, True),  # fp32 input must never silently use tf32
    ("gram_cross", "wgmma", "mma_sync", True),  # bf16 cross term: three bf16 products per chunk
    ("symmetrize", None, None, False),
    ("gptq_", None, None, False),  # fp32 math throughout
    ("qmm_large", "wgmma", "mma_sync", True),
    ("qmm_small", "mma_sync", "mma_sync", True),  # 16-row tiles are below wgmma's 64
    ("qmm_gemv", None, None, False),  # CUDA-core dot per column
    ("qmm_mma_large", "wgmma", "mma_sync", True),  # the same schedules on the CUDA GEMV's layout
    ("qmm_mma_small", "mma_sync", "mma_sync", True),
    ("qmm_mma_gemv", None, None, False),
]

def test_every_variant_compiled(compiled):
    assert set(compiled) == set(IDS), "variant lists differ between the interpreter and compiler imports"


@pytest.mark.parametrize("name,arch", [pytest.param(n, a, id=f"{n}-sm_{a}") for n, a in IDS])
def test_kernel_compiles(compiled, name, arch):
    r = compiled.get((name, arch))
    assert r is not None, f"{name} was not compiled for sm_{arch}"
    assert "error" not in r, r.get("error")
    assert r["registers"] > 0
    assert r["shared_bytes"] <= r["shared_limit"], (
        f"{name} needs {r['shared_bytes']} bytes of shared memory, sm_{arch} allows {r['shared_limit']}")
    prefix, tc90, tc80, pipelined = next(e for e in EXPECTED if name.startswith(e[0]))
    tensor_core = tc90 if arch == 90 else tc80
    for instr in ("wgmma", "mma_sync"):
        assert r[instr] == (instr == tensor_core), f"{name} on sm_{arch}: {instr} expected {instr == tensor_core}"
    if pipelined:
        assert r["pipelined"] and r["cp_async"], f"{name}: loads are not software-pipelined"
    if arch == 90:
        assert not r["spill_bytes"], f"{name} spills {r['spill_bytes']} bytes on sm_90 ({r['registers']} registers)"
