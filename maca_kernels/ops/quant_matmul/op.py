"""Public ``quant_matmul`` and its ``torch.library`` registration (so it works under torch.compile and
in CUDA graphs). ``backend=None`` picks by device: CUDA tensors run the Triton kernels, CPU tensors the
C++ kernel; ``"reference"`` is the plain-PyTorch definition; ``"triton"`` on CPU tensors needs
``TRITON_INTERPRET=1``."""

from __future__ import annotations

import contextlib

import torch

from .cpu_kernel import cpu_quant_matmul
from .reference import quant_matmul_reference
from .validate import validate_quant_matmul

_ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}
BACKENDS = (None, "triton", "cpp", "reference")


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
    backend: str,
    deterministic: bool,
) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if backend == "triton":
        from .triton_kernel import launch_quant_matmul

        on_gpu = x.device.type == "cuda"  # else the interpreter
        with torch.cuda.device(x.device) if on_gpu else contextlib.nullcontext():
            y = launch_quant_matmul(x2, qweight, scales, qzeros, g_idx, bits, group_size, zero_offset,
                                    deterministic=deterministic)
    else:
        fmt = "gptq" if zero_offset == 1 else "gptq_v2"
        y = cpu_quant_matmul(x2, qweight, scales, qzeros, g_idx, bits, group_size, fmt).to(x.dtype)
    return y.reshape(*x.shape[:-1], qweight.shape[1])


@_quant_matmul_op.register_fake
def _(x, qweight, scales, qzeros, g_idx, bits, group_size, zero_offset, backend, deterministic):
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))


def _resolve_backend(backend: str | None, x: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend is None:
        return "triton" if x.device.type == "cuda" else "cpp"
    if backend == "cpp" and x.device.type != "cpu":
        raise ValueError(f"backend='cpp' needs CPU tensors, got x on {x.device}")
    if backend == "triton":
        from ..._triton_utils import check_triton_device

        check_triton_device(x, "quant_matmul")
        if x.dtype == torch.float32:
            raise ValueError("x must be float16 or bfloat16 for backend='triton' (the tensor-core kernels); "
                             "got float32")
    return backend


def quant_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    bits: int = 4,
    group_size: int = 128,
    checkpoint_format: str = "gptq",
    *,
    backend: str | None = None,
    deterministic: bool = False,
) -> torch.Tensor:
    """``y = x @ dequant(W)ᵀ`` → ``[..., N]`` in x's dtype, from GPTQ checkpoint tensors.

    ``qweight`` int32 [K·bits/32, N], ``scales`` fp16 [G, N], ``qzeros`` int32 [G, N·bits/32], ``g_idx``
    int [K] (act-order; None means ``k // group_size``, the faster path), ``checkpoint_format``
    "gptq" (zeros stored minus one) or "gptq_v2". bits 2/3/4/8. ``backend`` None | "triton" | "cpp" |
    "reference". ``deterministic=True`` avoids the split-K schedules whose fp32 atomic adds make the last
    bits depend on timing (GPU only; the CPU kernel is always deterministic).
    """
    shape = validate_quant_matmul(x, qweight, scales, qzeros, g_idx, bits, group_size, checkpoint_format)
    backend = _resolve_backend(backend, x)
    if backend == "reference":
        y = quant_matmul_reference(x, qweight, scales, qzeros, shape.g_idx, bits, group_size, checkpoint_format)
        return y.to(x.dtype)
    return _quant_matmul_op(x, qweight, scales, qzeros, shape.g_idx, int(bits), shape.group or group_size,
                            _ZERO_OFFSET[checkpoint_format], backend, bool(deterministic))
