"""Round-to-nearest with GPTQ's group quantizer and no solve: the baseline every comparison reports."""

from __future__ import annotations

import torch

from ...formats.gptq import check_bits, check_group_size
from .quantizer import check_scales, dequantize, find_params, quantize
from .result import GPTQResult


def rtn_quantize(
    W: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = False,
    *,
    mse: bool = False,
    H: torch.Tensor | None = None,
    name: str | None = None,
) -> GPTQResult:
    """Quantize ``W`` [N, K] group by group with the same quantizer as ``gptq_quantize`` (fp16 scales,
    zeros never 0). ``loss`` is ``tr(ΔW H ΔWᵀ)`` when ``H`` is given, else NaN. ``name`` labels errors
    (e.g. the layer's name)."""
    where = f" (layer {name})" if name else ""
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.dtype.is_floating_point:
        raise ValueError(f"W must be a 2-D floating tensor [N, K], got {getattr(W, 'shape', type(W).__name__)}{where}")
    bits = check_bits(bits, where)
    if not isinstance(sym, bool):
        raise ValueError(f"sym must be a bool, got {sym!r}{where}")
    N, K = W.shape
    group_size = check_group_size(group_size, K, where)
    g = K if group_size == -1 else group_size
    maxq = 2**bits - 1
    Wf = W.float()
    codes = torch.empty(N, K, dtype=torch.int32, device=W.device)
    scales = torch.empty(N, K // g, dtype=torch.float32, device=W.device)
    zeros = torch.empty(N, K // g, dtype=torch.int32, device=W.device)
    weight = torch.empty(N, K, dtype=torch.float32, device=W.device)
    for j in range(K // g):
        cols = Wf[:, j * g : (j + 1) * g]
        scale, zero = find_params(cols, bits, sym, mse)
        q = quantize(cols, scale, zero, maxq)
        codes[:, j * g : (j + 1) * g] = q.to(torch.int32)
        weight[:, j * g : (j + 1) * g] = dequantize(q, scale, zero)
        scales[:, j], zeros[:, j] = scale, zero.to(torch.int32)
    check_scales(scales, name)
    loss = float("nan")
    if H is not None:
        dW = Wf - weight
        loss = float(((dW @ H.float()) * dW).sum())
    g_idx = (torch.arange(K, device=W.device) // g).to(torch.int32)
    perm = torch.arange(K, device=W.device)
    return GPTQResult(codes, scales, zeros, g_idx, weight, loss, 0.0, bits, group_size, sym, perm)
