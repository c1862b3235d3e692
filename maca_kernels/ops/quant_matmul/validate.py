"""The one validation of ``quant_matmul``'s arguments, shared by every backend (Triton, C++, reference).

Errors name the argument and what was expected. The g_idx value range is checked only for CPU
tensors: on CUDA it would cost a host sync per call (and fail inside a CUDA graph capture), so
``QuantLinear`` checks it once when the weights are loaded.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from ...formats.gptq import check_bits, check_checkpoint_format

X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class QmmShape:
    K: int
    N: int
    G: int
    group: int  # columns per group (K for one group); 0 when g_idx gives the groups
    g_idx: torch.Tensor | None  # int32, contiguous, or None


def run_len(bits: int) -> int:
    """Values per packing run along K (and N for qzeros): 32 values in 3 words at 3 bits."""
    return 32 if bits == 3 else 32 // bits


def int_arg(value, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {type(value).__name__}") from None


def _check_tensor(t, name: str, dtype: torch.dtype, layout: str, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype} {layout}, got dtype {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D {layout}, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous {layout}, got strides {tuple(t.stride())}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")


def validate_quant_matmul(x, qweight, scales, qzeros, g_idx, bits, group_size, checkpoint_format,
                          check_range: bool = False) -> QmmShape:
    """Checks x ``[..., K]`` against the GPTQ checkpoint tensors; returns the shapes and a normalised g_idx.
    The g_idx range is checked for CPU tensors, and for CUDA ones too with ``check_range``."""
    bits = check_bits(bits)
    check_checkpoint_format(checkpoint_format)
    group_size = int_arg(group_size, "group_size")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor [..., K], got {type(x).__name__}")
    if x.dtype not in X_DTYPES or x.dim() < 1:
        raise ValueError(f"x must be a float32/float16/bfloat16 tensor [..., K], got {x.dtype} {tuple(x.shape)}")
    K = x.shape[-1]
    run = run_len(bits)
    if K % run:
        what = "32 values into 3 words" if bits == 3 else f"{run} values per int32 word"
        raise ValueError(f"K = x.shape[-1] = {K} must be a multiple of {run} for bits={bits} (qweight packs {what})")

    _check_tensor(qweight, "qweight", torch.int32, "[K·bits/32, N]", x.device)
    if qweight.shape[0] != K * bits // 32:
        raise ValueError(f"qweight must be [K·bits/32, N] = [{K * bits // 32}, N] for K = x.shape[-1] = {K}, "
                         f"got {tuple(qweight.shape)}")
    N = qweight.shape[1]
    if N % run:
        raise ValueError(f"N = qweight.shape[1] = {N} must be a multiple of {run} for bits={bits} "
                         "(qzeros packs the zero points of N columns into whole int32 words)")
    _check_tensor(scales, "scales", torch.float16, "[G, N]", x.device)
    G = scales.shape[0]
    if scales.shape[1] != N or G < 1:
        raise ValueError(f"scales must be [G, N] with G ≥ 1 and N = qweight.shape[1] = {N}, got {tuple(scales.shape)}")
    _check_tensor(qzeros, "qzeros", torch.int32, "[G, N·bits/32]", x.device)
    if tuple(qzeros.shape) != (G, N * bits // 32):
        raise ValueError(f"qzeros must be [G, N·bits/32] = [{G}, {N * bits // 32}] (G from scales, N = {N}, "
                         f"bits = {bits}), got {tuple(qzeros.shape)}")

    if g_idx is None:
        group = K if group_size == -1 else group_size
        if group < 1 or (K and K % group) or (K and K // group != G):
            raise ValueError(f"group_size = {group_size} does not split K = {K} into the G = {G} groups of scales "
                             "(pass a positive divisor of K, or -1 for one group)")
        return QmmShape(K, N, G, max(group, 1), None)
    if not isinstance(g_idx, torch.Tensor):
        raise TypeError(f"g_idx must be a torch.Tensor [K] or None, got {type(g_idx).__name__}")
    if g_idx.dtype.is_floating_point or g_idx.dtype.is_complex or g_idx.dtype == torch.bool:
        raise ValueError(f"g_idx must be an integer tensor [K] = [{K}], got dtype {g_idx.dtype}")
    if g_idx.dim() != 1 or g_idx.shape[0] != K:
        raise ValueError(f"g_idx must be 1-D [K] = [{K}], got shape {tuple(g_idx.shape)}")
    if g_idx.device != x.device:
        raise ValueError(f"g_idx is on {g_idx.device} but x is on {x.device}")
    if g_idx.device.type == "cpu" or check_range:
        check_g_idx_range(g_idx, G)
    return QmmShape(K, N, G, 0, g_idx.to(torch.int32).contiguous())


def check_g_idx_range(g_idx: torch.Tensor, G: int, name: str = "g_idx") -> None:
    """Every group index in [0, G − 1] (a host sync for a CUDA tensor: done once per layer, at load)."""
    if g_idx.numel():
        lo, hi = (int(v) for v in torch.stack(torch.aminmax(g_idx)).tolist())
        if lo < 0 or hi >= G:
            raise ValueError(f"{name} must lie in [0, G − 1] = [0, {G - 1}], got values in [{lo}, {hi}]")
