"""Compile tier for the CUDA kernels (csrc/**/*.cu): nvcc builds them for sm_90a and sm_80 on this CPU
machine, and the GEMV variants are counted along the path that executes (gemv_sass.py, sass_walk.py: each
warp's walk at the slicing the launcher chooses for SPEC §5's shapes, prologue, load ring, groups, remainder,
the slices' sums and the stores included; a CTA's warps together over its weights).

Thread-instructions per weight against the issue rate: at 4 warp-instructions per clock per SM, 132 SMs and
1.98 GHz, an H200 issues about 33.5 T thread-instructions/s; streaming ~4.3 TB/s of packed int4 / int3 / int2
weights (8.6 / 11.5 / 17.2 T weights/s) leaves at most 3.9 / 2.9 / 1.95 per weight before issue rather than
bandwidth is the limit; stalls, the other warps' loads and the scales leave less: the budgets (SPEC §5) are
int4 ≤ 3.0, int3 ≤ 2.5, int2 ≤ 1.8. Act-order layers run the same kernels (rows in group order, x gathered
per warp into shared memory): the walk follows the sorted path.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.compile

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc" / "quant_matmul" / "gemv_mma.cu"
BUDGET = {4: 3.0, 3: 2.5, 2: 1.8}
# bf16 x: bf16's 7-bit mantissa forces a shift for the fields fp16 reads in place: held to the fp16 budget plus
# 10%; SPEC's GPU targets compare against fp16 matmuls.
BF16_ALLOWANCE = 1.1
# _m16 kernels (9..16 rows of x): the second mma and B fragment per decoded tile, per weight. SPEC's M = 16 target
# is for int4 (≥ 3x fp16); every width is held to its budget + 20% (bf16 + _m16: both allowances).
M16_ALLOWANCE = 1.2
NVCC = shutil.which("nvcc")


def _nvdisasm() -> str:
    import triton.backends.nvidia as nv

    return os.path.join(os.path.dirname(nv.__file__), "bin", "nvdisasm")


def _functions(sass: str) -> dict[str, list[str]]:
    funcs, name = {}, None
    for line in sass.splitlines():
        m = re.match(r"\s*\.text\.(\w+):", line)
        if m:
            name = m.group(1)
            funcs[name] = []
        elif name:
            funcs[name].append(line)
    return funcs


@pytest.fixture(scope="module")
def compiled():
    if NVCC is None:
        pytest.skip("nvcc not found")
    from gemv_sass import compile_gemv

    return {arch: compile_gemv(arch) for arch in ("sm_90a", "sm_80")}


KERNELS = [(4, 0), (4, 32), (4, 64), (4, 128), (3, 0), (3, 128), (2, 0), (2, 128)]
# (name, bits, group, bf16, 8-row tiles of x per decoded fragment: 1 for M <= 8, 2 for the _m16 kernels)
NAMES = [(f"maca_gemv_mma_{'bf16_' if bf16 else ''}b{b}_g{g}{'_m16' if mt == 2 else ''}", b, g, bf16, mt)
         for mt in (1, 2) for bf16 in (False, True) for b, g in KERNELS]
SHAPE_NAMES = ("4096x4096", "8192x28672")


def _budget(bits: int, bf16: bool, mt: int) -> float:
    return BUDGET[bits] * (M16_ALLOWANCE if mt == 2 else 1.0) * (BF16_ALLOWANCE if bf16 else 1.0)


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_every_variant_present_and_ptxas_spills_bounded(compiled, arch):
    funcs, log = compiled[arch]
    for name, *_ in NAMES:
        assert name in funcs, name
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    assert spills and max(spills) == 0, log[-2000:]


@pytest.mark.parametrize("name", [n for n, *_ in NAMES], ids=[n.removeprefix("maca_gemv_mma_") for n, *_ in NAMES])
def test_no_local_memory_on_the_executed_path(compiled, name):
    from gemv_sass import figures

    for shape in SHAPE_NAMES:
        f = figures(name, shape)
        assert f.spills == 0, f"{name} at {shape}: {f.spills} LDL / STL on the executed path"


@pytest.mark.parametrize("name,bits,bf16,mt", [n[:2] + n[3:] for n in NAMES],
                         ids=[n.removeprefix("maca_gemv_mma_") for n, *_ in NAMES])
@pytest.mark.parametrize("shape", SHAPE_NAMES)
def test_executed_instructions_per_weight_within_budget(compiled, name, bits, bf16, mt, shape):
    from gemv_sass import figures

    f = figures(name, shape)
    print(f"{name} at {shape}: {f.cta:.3f} per weight (warps {[round(w, 2) for w in f.warps]})")
    assert f.cta <= _budget(bits, bf16, mt), f"{f.cta:.3f} thread-instructions per weight"


@pytest.mark.parametrize("name,bits,group,bf16,mt", NAMES, ids=[n.removeprefix("maca_gemv_mma_") for n, *_ in NAMES])
def test_decode_on_the_executed_path(compiled, name, bits, group, bf16, mt):
    """The decode is what the layout promises on the path that runs: one LOP3 per f16x2 pair (two at int3), no
    per-value conversion; x's B fragments one 128-bit load per tile pair and 8-row tile; every weight load once."""
    from gemv_sass import gemv_plan, main_loop, variant_launch, walked_gemv
    from sass_walk import walk

    fns, _ = walked_gemv()
    fn = fns[name]
    launch = variant_launch(name, "8192x28672")
    tr = walk(fn, gemv_plan(fn, launch, mt, 0))
    loop = main_loop(fn, tr)

    def executed(op, a=loop.start, b=loop.end + 1):
        return tr.count(a, b, where=lambda ins: ins.opcode.startswith(op))

    pairs = executed("HMMA") // mt * 4
    assert pairs > 0 and executed("LOP3") >= pairs * (2 if bits == 3 else 1)
    assert sum(executed(op, 0, len(fn.instrs)) for op in ("I2F", "I2FP", "F2F.")) == 0
    loads = launch.K // (64 if bits == 4 else 128)  # 128-bit weight loads of the warp's range (one slice)
    assert executed("LD.E.128", 0, len(fn.instrs)) == loads * (2 if bits == 4 else 4) * mt  # x: per tile pair
    weight_loads = executed("LDG.E.128", 0, len(fn.instrs))
    assert loads <= weight_loads <= loads + 8, weight_loads  # the ring: the last trip re-reads at most its own


def _nvrtc():
    """libnvrtc from the nvidia-cuda-nvrtc-cu12 wheel (requirements-dev.txt): the run-time compiler a CUDA 12
    torch uses for this source (cuda_kernel.py), which rejects some code nvcc accepts (a generic lambda did)."""
    import ctypes

    try:
        import nvidia.cuda_nvrtc as pkg
    except ImportError:
        pytest.skip("nvidia-cuda-nvrtc-cu12 not installed")
    lib = Path(list(pkg.__path__)[0]) / "lib" / "libnvrtc.so.12"
    return ctypes.CDLL(str(lib))


@pytest.mark.parametrize("arch", ["80", "90"])
def test_nvrtc_compiles_every_kernel(arch):
    """Every kernel the launcher asks for compiles with NVRTC from the source it builds (the .cu's common part
    and one instantiation) and the options torch.cuda._compile_kernel passes (its architecture flag and
    torch's half / bf16 defines, no headers)."""
    import ctypes

    from torch.cuda._utils import _get_gpu_rtc_compatible_flags

    from maca_kernels.ops.quant_matmul.cuda_kernel import kernel_source

    lib = _nvrtc()
    opts = [f"--gpu-architecture=sm_{arch}".encode()] + [f.encode() for f in _get_gpu_rtc_compatible_flags()]
    for name, bits, group, bf16, mt in NAMES:
        src = kernel_source(bits, group, bf16, 8 * mt).encode()  # the launcher's one-kernel program
        prog = ctypes.c_void_p()
        assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, f"{name}.cu".encode(), 0, None, None) == 0
        assert lib.nvrtcAddNameExpression(prog, name.encode()) == 0
        res = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        lowered = ctypes.c_char_p()
        if res == 0:
            assert lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(lowered)) == 0
        symbol = lowered.value  # owned by the program: read before it is destroyed
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
        assert res == 0, f"{name}: {log.value.decode()[:2000]}"
        assert symbol == name.encode()  # extern "C": the name the launcher looks up
