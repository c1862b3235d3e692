"""Random GPTQ checkpoints for the quant_matmul tests (codes, zeros, scales and their packing)."""

from __future__ import annotations

import torch

from maca_kernels.formats.gptq import pack_gptq, pack_gptq_zeros


def random_checkpoint(N: int, K: int, bits: int, group_size: int, act_order: bool, seed: int = 0,
                      convention: str = "gptq"):
    """Returns (W float64 [N, K], qweight, scales fp16 [G, N], qzeros, g_idx int32 [K] or None)."""
    g = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    G = 1 if group_size == -1 else K // group_size
    codes = torch.randint(0, maxq + 1, (N, K), generator=g)
    zeros = torch.randint(1, maxq + 1, (N, G), generator=g)
    scales = (torch.rand(N, G, generator=g) * 0.02 + 0.001).half()
    gi = torch.arange(K) // (K // G)
    if act_order:
        gi = gi[torch.randperm(K, generator=g)]
    W = (codes - zeros[:, gi]).double() * scales.double()[:, gi]
    return (W, pack_gptq(codes, bits), scales.T.contiguous(), pack_gptq_zeros(zeros, bits, convention),
            gi.to(torch.int32) if act_order else None)
