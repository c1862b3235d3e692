"""Round-to-nearest with GPTQ's group quantizer and no solve: the baseline every comparison reports."""

from __future__ import annotations

import torch

from .quantizer import dequantize, find_params, quantize
from .result import GPTQResult


def rtn_quantize(
    W: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = False,
    *,
    mse: bool = False,
    H: torch.Tensor | None = None,
) -> GPTQResult:
    """Quantize ``W`` [N, K] group by group with the same quantizer as ``gptq_quantize`` (fp16 scales,
    zeros never 0). ``loss`` is ``tr(ΔW H ΔWᵀ)`` when ``H`` is given, else NaN."""
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.dtype.is_floating_point:
        raise ValueError(f"W must be a 2-D floating tensor [N, K], got {getattr(W, 'shape', type(W).__name__)}")
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be one of (2, 3, 4, 8), got {bits!r}")
    N, K = W.shape
    g = K if group_size == -1 else group_size
    if not isinstance(g, int) or g <= 0 or K % g:
        raise ValueError(f"group_size = {group_size} must divide K = {K} (or be -1 for one group)")
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
    loss = float("nan")
    if H is not None:
        dW = Wf - weight
        loss = float(((dW @ H.float()) * dW).sum())
    g_idx = (torch.arange(K, device=W.device) // g).to(torch.int32)
    perm = torch.arange(K, device=W.device)
    return GPTQResult(codes, scales, zeros, g_idx, weight, loss, 0.0, bits, group_size, sym, perm)
