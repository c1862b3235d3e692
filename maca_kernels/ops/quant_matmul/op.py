"""Public ``quant_matmul`` and its ``torch.library`` registration (so it works under torch.compile and
in CUDA graphs): CUDA tensors run the Triton kernels, CPU tensors the C++ kernel."""

from __future__ import annotations

import torch

from ...formats.gptq import CONVENTIONS
from .cpu_kernel import cpu_quant_matmul

_ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}


@torch.library.custom_op("maca_kernels::quant_matmul", mutates_args=())
def _quant_matmul_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    group_size: int,
    zero_offset: int,
) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if x.device.type == "cuda":
        from .triton_kernel import launch_quant_matmul

        with torch.cuda.device(x.device):
            y = launch_quant_matmul(x2, qweight, scales, qzeros, g_idx, bits, group_size, zero_offset)
    else:
        convention = "gptq" if zero_offset == 1 else "gptq_v2"
        y = cpu_quant_matmul(x2, qweight, scales, qzeros, g_idx, bits, group_size, convention).to(x.dtype)
    return y.reshape(*x.shape[:-1], qweight.shape[1])


@_quant_matmul_op.register_fake
def _(x, qweight, scales, qzeros, g_idx, bits, group_size, zero_offset):
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))


def _validate(x, qweight, scales, qzeros, g_idx, bits, group_size, checkpoint_format) -> None:
    """Shape/dtype/device checks shared by both devices (the CPU kernel checks the rest again)."""
    if checkpoint_format not in CONVENTIONS:
        raise ValueError(f"checkpoint_format must be one of {CONVENTIONS}, got {checkpoint_format!r}")
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be one of (2, 3, 4, 8), got {bits!r}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError("x must be a float16/bfloat16/float32 tensor [..., K]")
    if x.device.type == "cuda" and x.dtype == torch.float32:
        raise ValueError("x must be float16 or bfloat16 on CUDA (the tensor-core kernels); got float32")
    K = x.shape[-1]
    run = 32 if bits == 3 else 32 // bits
    if K % run:
        raise ValueError(f"K = x.shape[-1] = {K} must be a multiple of {run} for bits={bits}")
    for name, t, dtype in (("qweight", qweight, torch.int32), ("qzeros", qzeros, torch.int32),
                           ("scales", scales, torch.float16)):
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D {dtype} tensor")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    N = qweight.shape[1]
    if qweight.shape[0] != K * bits // 32:
        raise ValueError(f"qweight must be [K·bits/32, N] = [{K * bits // 32}, N] for K = {K}, "
                         f"got {tuple(qweight.shape)}")
    G = scales.shape[0]
    if scales.shape[1] != N or tuple(qzeros.shape) != (G, N * bits // 32):
        raise ValueError(f"scales must be [G, N] and qzeros [G, N·bits/32] with N = {N}; got {tuple(scales.shape)} "
                         f"and {tuple(qzeros.shape)}")
    if N % run:
        raise ValueError(f"N = {N} must be a multiple of {run} for bits={bits} (qzeros packs along N)")
    if g_idx is None:
        g = K if group_size == -1 else group_size
        if not isinstance(group_size, int) or g <= 0 or K % g or K // g != G:
            raise ValueError(f"group_size = {group_size} does not split K = {K} into the G = {G} groups of scales")
    elif (not isinstance(g_idx, torch.Tensor) or g_idx.shape != (K,) or g_idx.dtype != torch.int32
          or g_idx.device != x.device):
        raise ValueError(f"g_idx must be an int32 [K] = [{K}] tensor on {x.device}")


def quant_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    bits: int = 4,
    group_size: int = 128,
    checkpoint_format: str = "gptq",
) -> torch.Tensor:
    """``y = x @ dequant(W)ᵀ`` → ``[..., N]`` in x's dtype, from GPTQ checkpoint tensors.

    ``qweight`` int32 [K·bits/32, N], ``scales`` fp16 [G, N], ``qzeros`` int32 [G, N·bits/32], ``g_idx``
    int32 [K] (act-order; None means ``k // group_size``, the faster path), ``checkpoint_format``
    "gptq" (zeros stored minus one) or "gptq_v2". bits 2/3/4/8.
    """
    _validate(x, qweight, scales, qzeros, g_idx, bits, group_size, checkpoint_format)
    return _quant_matmul_op(x, qweight, scales, qzeros, g_idx, bits, group_size, _ZERO_OFFSET[checkpoint_format])
