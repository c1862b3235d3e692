"""Tier 2: every Triton kernel variant compiled for sm_90 and sm_80 on this CPU machine.

One subprocess (without TRITON_INTERPRET) compiles all variants in parallel; each variant is then its
own test. Beyond "it compiles" this checks what decides speed and exactness on the GPU: no register
spills on sm_90, tensor-core instructions (wgmma on sm_90, mma.sync on sm_80) with pipelined async
loads for 16-bit inputs, and no tensor-core (tf32) instructions at all for fp32 inputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
from compile_tier import ARCHS, variant_names  # noqa: E402

pytestmark = pytest.mark.compile


@pytest.fixture(scope="session")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(HERE)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, os.path.join(HERE, "compile_tier.py")], env=env, cwd=root,
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-4000:]
    return {(r["name"], r["arch"]): r for r in json.loads(res.stdout)}


# (name prefix, tensor-core instruction expected on sm_90, on sm_80, software-pipelined loads expected)
EXPECTED = [
    ("gram_bf16", "wgmma", "mma_sync", True),
    ("gram_fp16", "wgmma", "mma_sync", True),
    ("gram_fp32", None, None, True),  # fp32 input must never silently use tf32
    ("gram_cross", None, None, True),
    ("symmetrize", None, None, False),
    ("gptq_", None, None, False),  # fp32 math throughout
    ("qmm_large", "wgmma", "mma_sync", True),
    ("qmm_small", "mma_sync", "mma_sync", True),  # 16-row tiles are below wgmma's 64
    ("qmm_gemv", None, None, False),  # CUDA-core dot per column
]


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("name", variant_names())
def test_kernel_compiles(compiled, name, arch):
    r = compiled[(name, arch)]
    assert "error" not in r, r.get("error")
    assert r["registers"] > 0
    prefix, tc90, tc80, pipelined = next(e for e in EXPECTED if name.startswith(e[0]))
    tensor_core = tc90 if arch == 90 else tc80
    if arch == 90:
        assert r["spill_bytes"] == 0, f"{name} spills {r['spill_bytes']} bytes on sm_90"
    for instr in ("wgmma", "mma_sync"):
        assert r[instr] == (instr == tensor_core), f"{name} on sm_{arch}: {instr} expected {instr == tensor_core}"
    if pipelined:
        assert r["pipelined"] and r["cp_async"], f"{name}: loads are not software-pipelined"
