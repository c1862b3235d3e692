"""Launcher for the C++ packed low-bit matmul (``csrc/quant_matmul``), zero-copy on CPU tensors.

Checkpoint tensors go to the kernel as they are stored (``qweight`` int32 ``[K·bits/32, N]``, ``qzeros``
int32 ``[G, N·bits/32]``, ``scales`` fp16 ``[G, N]``, ``g_idx`` ``[K]``); x may be fp32, fp16 or bf16 with
any row stride. The kernel computes in fp32 and writes an fp32 ``[M, N]`` result.
"""

from __future__ import annotations

import operator

import torch

from ..._native import require_native
from ...formats.gptq import CONVENTIONS, SUPPORTED_BITS

_X_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _run_len(bits: int) -> int:
    return 32 if bits == 3 else 32 // bits


def _int_arg(value, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {type(value).__name__}") from None


def _check_tensor(t, name: str, dtype: torch.dtype, dim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor for the C++ kernel, got device {t.device}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype} {layout}, got dtype {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D {layout}, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous {layout}, got strides {tuple(t.stride())}")


def cpu_quant_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    bits: int = 4,
    group_size: int = 128,
    convention: str = "gptq",
    *,
    out: torch.Tensor | None = None,
    num_threads: int = 0,
) -> torch.Tensor:
    """``y = x @ dequant(W)ᵀ`` as fp32 ``[M, N]`` for ``x`` ``[M, K]`` (fp32 / fp16 / bf16, rows any stride).

    ``dequant(W)[n, k] = (code[n, k] − zero[n, g(k)]) · scale[n, g(k)]`` with ``g(k) = g_idx[k]`` when
    ``g_idx`` is given (any order: act-order checkpoints) and ``k // group_size`` otherwise
    (``group_size=-1``: one group). ``convention`` "gptq" stores ``zero − 1`` in qzeros, "gptq_v2" the
    zero itself. ``out`` (fp32 ``[M, N]``, unit stride along N) receives the result when given.
    ``num_threads`` ≤ 0: torch's thread count.
    """
    bits = _int_arg(bits, "bits")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    group_size = _int_arg(group_size, "group_size")

    # x: [M, K], unit stride along K (a non-unit inner stride is copied once; x is small next to W).
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type != "cpu":
        raise ValueError(f"x must be a CPU tensor for the C++ kernel, got device {x.device}")
    if x.dtype not in _X_DTYPE_CODE:
        raise ValueError(f"x must be float32, float16 or bfloat16, got dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    M, K = x.shape
    if (K > 1 and x.stride(1) != 1) or (M > 1 and x.stride(0) < K):
        x = x.contiguous()
    ldx = x.stride(0) if M > 1 else K

    run = _run_len(bits)
    if K % run:
        raise ValueError(
            f"K = x.shape[1] = {K} must be a multiple of {run} for bits={bits} "
            f"(qweight packs {'32 values into 3 words' if bits == 3 else f'{run} values per int32 word'} along K)"
        )

    _check_tensor(qweight, "qweight", torch.int32, 2, "[K·bits/32, N]")
    rows = K * bits // 32
    if qweight.shape[0] != rows:
        raise ValueError(
            f"qweight must have K·bits/32 = {K}·{bits}/32 = {rows} rows for K = x.shape[1] = {K}, "
            f"got shape {tuple(qweight.shape)}"
        )
    N = qweight.shape[1]
    zrun = _run_len(bits)
    if N % zrun:
        raise ValueError(
            f"N = qweight.shape[1] = {N} must be a multiple of {zrun} for bits={bits} "
            f"(qzeros packs the zero points of N columns into whole int32 words)"
        )

    _check_tensor(scales, "scales", torch.float16, 2, "[G, N]")
    G = scales.shape[0]
    if scales.shape[1] != N or G < 1:
        raise ValueError(
            f"scales must be [G, N] with G ≥ 1 and N = qweight.shape[1] = {N}, got shape {tuple(scales.shape)}"
        )
    _check_tensor(qzeros, "qzeros", torch.int32, 2, "[G, N·bits/32]")
    zcols = N * bits // 32
    if tuple(qzeros.shape) != (G, zcols):
        raise ValueError(
            f"qzeros must be [G, N·bits/32] = [{G}, {zcols}] (G from scales, N = {N}, bits = {bits}), "
            f"got shape {tuple(qzeros.shape)}"
        )

    if g_idx is None:
        if group_size == -1:
            group_size = max(K, 1)
        if group_size < 1:
            raise ValueError(f"group_size must be a positive int or -1 (one group), got {group_size}")
        if K % group_size:
            raise ValueError(f"K = x.shape[1] = {K} must be a multiple of group_size = {group_size}")
        if K and K // group_size != G:
            raise ValueError(f"scales has G = {G} groups but K / group_size = {K} / {group_size} = {K // group_size}")
        g_ptr = 0
    else:
        if not isinstance(g_idx, torch.Tensor):
            raise TypeError(f"g_idx must be a torch.Tensor or None, got {type(g_idx).__name__}")
        if g_idx.device.type != "cpu":
            raise ValueError(f"g_idx must be a CPU tensor for the C++ kernel, got device {g_idx.device}")
        if g_idx.dtype.is_floating_point or g_idx.dtype.is_complex or g_idx.dtype == torch.bool:
            raise ValueError(f"g_idx must be an integer tensor, got dtype {g_idx.dtype}")
        if g_idx.dim() != 1 or g_idx.shape[0] != K:
            raise ValueError(f"g_idx must be 1-D [K] = [{K}], got shape {tuple(g_idx.shape)}")
        if K:
            lo, hi = (int(v) for v in torch.stack(torch.aminmax(g_idx)).tolist())
            if lo < 0 or hi >= G:
                raise ValueError(f"g_idx must lie in [0, G − 1] = [0, {G - 1}], got values in [{lo}, {hi}]")
        g_idx = g_idx.to(torch.int32).contiguous()
        g_ptr = g_idx.data_ptr()
        group_size = 0

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
        1 if convention == "gptq" else 0,
        threads,
    )
    return out
