"""Launcher of the CUDA GEMV on the mma layout (``csrc/quant_matmul/gemv_mma.cu``, ``mma_layout.py``).

Each kernel is compiled at first use per device by NVRTC through ``torch.cuda._compile_kernel`` from its
own source (the .cu's common part and one instantiation: ~0.25 s; no build step, no torch headers); it
needs the repository's ``csrc`` folder (an in-place install, as ``make build`` does). ``available()`` says
whether this machine can run it. The op is registered with ``torch.library`` (fake implementation
included), so it works under torch.compile and in CUDA graphs once compiled: call it once outside a
capture first.

Status: the kernel's own source runs on the CPU in the tests (tests/ops/quant_matmul/host_gemv.py: every thread
a host thread, the PTX helpers in C++), checked against float64, and so does a lane-level model of its decoding
(mma_emulator.py); the SASS is counted on its executed path and the NVRTC build checked by the compile tier; on
a GPU it runs in tests/ops/quant_matmul/test_quant_matmul_gpu.py and ``make gpu-check``. Until a GPU run has
confirmed it, it is opt-in: ``DecodeWeight.matmul(x, backend="cuda")``, ``QuantLinear.enable_cuda_gemv()``,
``maca_kernels.enable_cuda_gemv(model)``; batches above ``MAX_M`` rows run the Triton kernels on the same
layout (``triton_kernel.launch_mma_matmul``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .mma_layout import VEC_K, MmaWeight

SOURCE = Path(__file__).resolve().parents[3] / "csrc" / "quant_matmul" / "gemv_mma.cu"
MAX_M = 16  # rows of x: 8 per mma (the columns of its B operand), two mma's per decoded fragment above 8
MAX_SLICES = 8  # kMaxSlices in the .cu: warps per CTA, each a range of K
WARPS_PER_SM = 8  # warps per SM the slicing aims at: 8 x 4 KB of loads in flight, ~23 KB needed for 4.3 TB/s
SHARED_LIMIT = 48 * 1024  # dynamic shared memory a launch may use without opting in
_COMPILED: dict[tuple[int, str], tuple[object, int]] = {}


def available() -> bool:
    """A CUDA device, torch's NVRTC wrapper with the CUDA headers it adds (CUDA_HOME), and the source."""
    if not (torch.cuda.is_available() and hasattr(torch.cuda, "_compile_kernel") and SOURCE.exists()):
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None


def kernel_name(bits: int, group: int, bf16: bool = False, rows: int = 1) -> str:
    """The .cu's kernel for these bits, GROUP (0: one group), x dtype and rows of x (_m16 above 8)."""
    return f"maca_gemv_mma_{'bf16_' if bf16 else ''}b{bits}_g{group}{'_m16' if rows > 8 else ''}"


def kernel_source(bits: int, group: int, bf16: bool = False, rows: int = 1) -> str:
    """The source of that one kernel: the .cu up to its instantiations, and one MACA_GEMV_MMA line (NVRTC
    compiles every kernel of a program: the whole file would take ~6 s per kernel asked for)."""
    text = SOURCE.read_text()
    head = text[: text.index("// MACA_INSTANTIATIONS")]
    flag, tiles = "true" if bf16 else "false", 2 if rows > 8 else 1
    return f"{head}MACA_GEMV_MMA({kernel_name(bits, group, bf16, rows)}, {bits}, {group}, {flag}, {tiles})\n"


def _compiled(bits: int, group: int, bf16: bool, rows: int, device: torch.device):
    """The kernel, compiled once per device."""
    name = kernel_name(bits, group, bf16, rows)
    key = (device.index if device.index is not None else torch.cuda.current_device(), name)
    if key not in _COMPILED:
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            raise RuntimeError(f"the CUDA GEMV needs mma.sync.m16n8k16 (sm_80 or newer), device is sm_{major}{minor}")
        with torch.cuda.device(device):
            kernel = torch.cuda._compile_kernel(kernel_source(bits, group, bf16, rows), name,
                                                compute_capability=f"{major}{minor}")
            _COMPILED[key] = kernel
    return _COMPILED[key]


def slicing(w: MmaWeight, n_sms: int, deterministic: bool = False, max_slices: int = MAX_SLICES) -> tuple[int, int]:
    """(warps per CTA, K per warp): each CTA is one 16-column tile, its warps ("slices") split K into ranges of
    whole groups and loads, added in shared memory at the end. Enough slices that the GPU holds ~WARPS_PER_SM
    warps per SM (each keeps 4 KB of weights in flight), at most ``max_slices``; ``deterministic``: one slice,
    so the bits do not depend on the GPU's number of SMs either."""
    unit = math.lcm(w.group_size if w.kernel_group else VEC_K[w.bits], VEC_K[w.bits])
    units = -(-w.K // unit)
    n_tiles = -(-w.N // 16)
    slices = 1 if deterministic else max(1, min(max_slices, units, round(WARPS_PER_SM * n_sms / n_tiles)))
    k_slice = -(-units // slices) * unit
    return -(-w.K // k_slice), k_slice


@dataclass
class LaunchPlan:
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int  # bytes of dynamic shared memory
    args: list  # the kernel's arguments (tensors and ints)
    y: torch.Tensor  # the output, written by the kernel alone


def launch_plan(x: torch.Tensor, w: MmaWeight, n_sms: int, deterministic: bool = False) -> LaunchPlan:
    """One launch for checked ``x`` [M, K] (unit stride along K) on a GPU with ``n_sms`` SMs; the host emulation
    of the tests runs the same plan on the CPU."""
    M, K, N = x.shape[0], w.K, w.N
    if x.stride(0) % 8 or x.data_ptr() % 16:  # the kernel reads x in 16-byte pieces
        x = x.clone(memory_format=torch.contiguous_format)
    tiles = 2 if M > 8 else 1
    trip_k = (8 if tiles == 1 else 4) * VEC_K[w.bits]  # the kernel's Prefetch<MT> loads of k
    max_slices = MAX_SLICES
    if w.perm is not None:  # each warp stages M rows of one trip of gathered x: stay under 48 KB
        max_slices = max(1, min(MAX_SLICES, SHARED_LIMIT // (M * trip_k * 2)))
    slices, k_slice = slicing(w, n_sms, deterministic, max_slices)
    staged = slices * M * trip_k * 2 if w.perm is not None else 0
    reduced = (slices - 1) * tiles * 4 * 32 * 4
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)  # written once, by the kernel: no fill
    perm = w.perm
    args = [x, x.stride(0), w.words if perm is None else perm, int(perm is not None), w.words,
            w.hwords if w.hwords.numel() else w.words, w.scales, w.zeros, y, N, M, N, K, k_slice]
    return LaunchPlan((-(-N // 16), 1, 1), (32 * slices, 1, 1), max(staged, reduced), args, y)


@torch.library.custom_op("maca_kernels::gemv_mma", mutates_args=())
def _gemv_mma_op(x: torch.Tensor, words: torch.Tensor, hwords: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor, perm: torch.Tensor | None, bits: int, group_size: int, K: int, N: int,
                 deterministic: bool) -> torch.Tensor:
    w = MmaWeight(words, hwords, scales, zeros, bits, group_size, K, N, perm)
    M = x.shape[0]
    if not 1 <= M <= MAX_M or x.dim() != 2 or x.shape[1] != K or x.stride(1) != 1:  # also for torch.ops calls
        raise ValueError(f"gemv_mma: x must be [M, K] with 1 ≤ M ≤ {MAX_M}, K = {K}, unit stride; got "
                         f"{tuple(x.shape)} strides {x.stride()}")
    if perm is not None and (perm.dtype != torch.int32 or tuple(perm.shape) != (K,) or perm.device != x.device
                             or perm.stride(0) != 1):
        raise ValueError(f"gemv_mma: perm must be a contiguous int32 [K] = [{K}] on {x.device}, got {perm.dtype} "
                         f"{tuple(perm.shape)} on {perm.device}")
    n_sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    kernel = _compiled(bits, w.kernel_group, x.dtype == torch.bfloat16, M, x.device)
    plan = launch_plan(x, w, n_sms, deterministic)
    with torch.cuda.device(x.device):  # x may live on another GPU than the current one
        kernel(grid=plan.grid, block=plan.block, args=plan.args, shared_mem=plan.shared_mem,
               stream=torch.cuda.current_stream(x.device))
    return plan.y


@_gemv_mma_op.register_fake
def _(x, words, hwords, scales, zeros, perm, bits, group_size, K, N, deterministic):
    return x.new_empty((x.shape[0], N))


def gemv_mma(x2: torch.Tensor, w: MmaWeight, deterministic: bool = False) -> torch.Tensor:
    """``x2 [M, K] @ dequant(W)ᵀ`` → ``[M, N]`` in x2's dtype for fp16 / bf16 x2 on CUDA, M ≤ 16 (checked here);
    x2 in input order (gathered in the kernel by ``w.perm``). Every launch gives the same bits (the warps' sums
    over their ranges of K are added in a fixed order, in shared memory); ``deterministic``: all of K in one
    warp per 16 columns, so the bits do not depend on the GPU's number of SMs either."""
    if not available():
        raise RuntimeError("the CUDA GEMV needs a CUDA device, torch.cuda._compile_kernel (NVRTC) with the CUDA "
                           f"toolkit's headers (CUDA_HOME) and the repository's "
                           f"{SOURCE.relative_to(SOURCE.parents[2])}")
    if x2.device.type != "cuda" or x2.dtype not in (torch.float16, torch.bfloat16) or x2.dim() != 2:
        raise ValueError(f"x must be a 2-D float16 or bfloat16 CUDA tensor for backend='cuda', got {x2.dtype} "
                         f"{tuple(x2.shape)} on {x2.device}")
    if not 1 <= x2.shape[0] <= MAX_M:
        raise ValueError(f"backend='cuda' runs batch sizes 1..{MAX_M} (rows of x), got {x2.shape[0]}")
    if x2.shape[1] != w.K:
        raise ValueError(f"x must be [M, K] with K = {w.K}, got {tuple(x2.shape)}")
    if w.scales.dtype != torch.float16 or w.words.dtype != torch.int32 or w.zeros.dtype != torch.uint8:
        raise ValueError(f"the mma layout must hold int32 words, fp16 scales and uint8 zeros, got {w.words.dtype}, "
                         f"{w.scales.dtype}, {w.zeros.dtype}")
    if w.words.device != x2.device:
        raise ValueError(f"the weight is on {w.words.device} but x is on {x2.device}")
    if x2.stride(1) != 1 or x2.stride(0) < w.K:
        x2 = x2.contiguous()
    return _gemv_mma_op(x2, w.words, w.hwords, w.scales, w.zeros, w.perm, w.bits, w.group_size, w.K, w.N,
                        bool(deterministic))
