"""Launcher for the C++ packed low-bit matmul (``csrc/quant_matmul``), zero-copy on CPU tensors.

Checkpoint tensors go to the kernel as they are stored (``qweight`` int32 ``[K·bits/32, N]``, ``qzeros``
int32 ``[G, N·bits/32]``, ``scales`` fp16 ``[G, N]``, ``g_idx`` ``[K]``); x may be fp32, fp16 or bf16 with
any row stride. The kernel computes in fp32 and writes an fp32 ``[M, N]`` result.
"""

from __future__ import annotations

import torch

from ..._native import require_native
from .validate import validate_quant_matmul

_X_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# Rows of x from which the weight is dequantized once and multiplied by torch's fp32 GEMM: decoding costs
# ~1-2.5 ns per weight, amortised over M rows, while the BLAS's AVX-512 GEMM beats our AVX2 tiles by ~2× at
# large M. Measured here (2 cores): the crossover is M ≈ 110 at 576×1536 and ≈ 375 at 4096×4096; at M = 2048
# 13.5 vs 25.5 ms and 281 vs 469 ms.
DEQUANT_MIN_ROWS = 512


def cpu_quant_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    bits: int = 4,
    group_size: int = 128,
    checkpoint_format: str = "gptq",
    *,
    out: torch.Tensor | None = None,
    num_threads: int = 0,
) -> torch.Tensor:
    """``y = x @ dequant(W)ᵀ`` as fp32 ``[M, N]`` for ``x`` ``[M, K]`` (fp32 / fp16 / bf16, rows any stride).

    ``dequant(W)[n, k] = (code[n, k] − zero[n, g(k)]) · scale[n, g(k)]`` with ``g(k) = g_idx[k]`` when
    ``g_idx`` is given (any order: act-order checkpoints) and ``k // group_size`` otherwise
    (``group_size=-1``: one group). ``checkpoint_format`` "gptq" stores ``zero − 1`` in qzeros, "gptq_v2"
    the zero itself. ``out`` (fp32 ``[M, N]``, unit stride along N) receives the result when given.
    ``num_threads`` ≤ 0: torch's thread count.
    """
    shape = validate_quant_matmul(x, qweight, scales, qzeros, g_idx, bits, group_size, checkpoint_format)
    if x.device.type != "cpu":
        raise ValueError(f"x must be a CPU tensor for the C++ kernel, got device {x.device}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    M, K = x.shape
    N, G = shape.N, shape.G
    # unit stride along K (a non-unit inner stride is copied once; x is small next to W)
    if (K > 1 and x.stride(1) != 1) or (M > 1 and x.stride(0) < K):
        x = x.contiguous()
    ldx = x.stride(0) if M > 1 else K
    g_ptr = 0 if shape.g_idx is None else shape.g_idx.data_ptr()
    group_size = 0 if shape.g_idx is not None else shape.group

    if out is None:
        out = torch.empty(M, N, dtype=torch.float32)
    else:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if out.device.type != "cpu" or out.dtype != torch.float32 or tuple(out.shape) != (M, N):
            raise ValueError(
                f"out must be a CPU float32 [M, N] = [{M}, {N}] tensor, got {out.device} {out.dtype} {tuple(out.shape)}"
            )
        if N > 1 and out.stride(1) != 1 or M > 1 and out.stride(0) < N:
            raise ValueError(f"out must have unit stride along N and rows ≥ N apart, got strides {tuple(out.stride())}")
    if M == 0 or N == 0:
        return out

    C = require_native("quant_matmul")
    threads = num_threads if num_threads > 0 else torch.get_num_threads()
    if M >= DEQUANT_MIN_ROWS and threads == torch.get_num_threads():
        # the weight decoded once, then torch's fp32 GEMM (faster than our tiles here; it takes torch's threads)
        wt = _dequantize(C, qweight, scales, qzeros, g_ptr, K, N, G, group_size, bits, checkpoint_format, threads)
        # (the BLAS sums in another order than the tiles: results agree to fp32 rounding, not bit for bit)
        return torch.mm(x.detach().float(), wt, out=out)
    C.quant_matmul(
        out.data_ptr(),
        out.stride(0) if M > 1 else N,
        x.data_ptr(),
        _X_DTYPE_CODE[x.dtype],
        ldx,
        M,
        N,
        K,
        qweight.data_ptr(),
        qzeros.data_ptr(),
        scales.data_ptr(),
        g_ptr,
        G,
        group_size,
        bits,
        1 if checkpoint_format == "gptq" else 0,
        threads,
    )
    return out


def _dequantize(C, qweight, scales, qzeros, g_ptr, K, N, G, group_size, bits, checkpoint_format, threads):
    wt = torch.empty(K, N, dtype=torch.float32)
    C.quant_dequantize(wt.data_ptr(), N, K, qweight.data_ptr(), qzeros.data_ptr(), scales.data_ptr(), g_ptr, G,
                       group_size, bits, 1 if checkpoint_format == "gptq" else 0, threads)
    return wt


def cpu_dequantize(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, g_idx: torch.Tensor | None = None,
                   bits: int = 4, group_size: int = 128, checkpoint_format: str = "gptq", *,
                   num_threads: int = 0) -> torch.Tensor:
    """``dequant(W)ᵀ`` as fp32 ``[K, N]``: ``(code − zero)·scale`` per weight, one rounding (the C++ decoder)."""
    K = qweight.shape[0] * 32 // bits
    x = torch.empty(0, K, dtype=torch.float32)
    shape = validate_quant_matmul(x, qweight, scales, qzeros, g_idx, bits, group_size, checkpoint_format)
    g_ptr = 0 if shape.g_idx is None else shape.g_idx.data_ptr()
    group_size = 0 if shape.g_idx is not None else shape.group
    threads = num_threads if num_threads > 0 else torch.get_num_threads()
    return _dequantize(require_native("quant_matmul"), qweight, scales, qzeros, g_ptr, K, shape.N, shape.G,
                       group_size, bits, checkpoint_format, threads)
