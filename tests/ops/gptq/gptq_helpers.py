"""Inputs for the GPTQ tests: real-looking Hessians from random correlated activations."""

from __future__ import annotations

import torch


def correlated_problem(N: int, K: int, seed: int = 0, tokens: int = 2048, device="cpu"):
    """W [N, K], H = XᵀX/T from activations with correlated channels and uneven scales (like an LLM's),
    and the GPTAQ cross term ΔXᵀX/T for a small input perturbation ΔX."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g) * (0.3 / K**0.5) + torch.eye(K)
    channel_scale = torch.exp(torch.randn(K, generator=g) * 0.7)
    X = (torch.randn(tokens, K, generator=g) @ mix) * channel_scale
    H = X.T @ X / tokens
    W = torch.randn(N, K, generator=g) * 0.05
    dX = 0.05 * torch.randn(tokens, K, generator=g) * channel_scale
    dxxt = dX.T @ X / tokens
    return W.to(device), H.to(device), dxxt.to(device)


def rtn_loss(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, sym: bool) -> float:
    """Round-to-nearest with the same quantizer: the baseline GPTQ must beat."""
    from maca_kernels.ops.gptq.quantizer import dequantize, find_params, quantize

    K = W.shape[1]
    g = group_size if group_size > 0 else K
    Q = torch.empty_like(W)
    for i in range(0, K, g):
        s, z = find_params(W[:, i : i + g], bits, sym)
        Q[:, i : i + g] = dequantize(quantize(W[:, i : i + g], s, z, 2**bits - 1), s, z)
    dW = W - Q
    return float(((dW @ H) * dW).sum())
