"""Plain-PyTorch reference for the packed low-bit matmul: dequantize, then an fp32 matmul.

``W = (code − zero[:, g_idx]) · scale[:, g_idx]`` is exact in fp32 (``formats.gptq.dequantize_gptq``),
so this differs from the exact product only by the fp32 matmul's rounding.
"""

from __future__ import annotations

import torch

from ...formats.gptq import dequantize_gptq


def default_g_idx(K: int, group_size: int, device=None) -> torch.Tensor:
    """``k // group_size`` (int32 [K]); ``group_size`` −1 (or ≥ K) means one group."""
    if group_size == -1 or group_size >= K:
        return torch.zeros(K, dtype=torch.int32, device=device)
    return (torch.arange(K, device=device) // group_size).to(torch.int32)


def quant_matmul_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    bits: int = 4,
    group_size: int = 128,
    checkpoint_format: str = "gptq",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``x [..., K] @ dequant(W)ᵀ`` → ``[..., N]`` computed in ``dtype`` (fp32 reference, fp64 ground truth)."""
    K = x.shape[-1]
    if g_idx is None:
        g_idx = default_g_idx(K, group_size, device=qweight.device)
    W = dequantize_gptq(qweight, scales, qzeros, g_idx, bits, checkpoint_format)  # fp32 [N, K], exact
    return x.to(dtype) @ W.to(device=x.device, dtype=dtype).T
