"""Plain-PyTorch GPTQ / GPTAQ column sweep (the algorithm of Frantar et al. 2022, Li et al. 2025).

Blocks of ``block_size`` columns against the upper Cholesky factor ``U`` of ``H⁻¹``: quantize a
column, ``err = (w − q)/U_ii``, update the rest of the block with ``err ⊗ U_i,i:`` (GPTAQ: minus
``w ⊗ P_i,i:``), then one lazy update of all later columns with ``Err·U_blk,rest`` (GPTAQ: minus
``W_blk·P_blk,rest``, where ``W_blk`` holds each column's value when it was quantized, so the blocked
sweep equals the column-by-column one). Dynamic group parameters are found when a group starts,
from the up-to-date weights of its columns.
"""

from __future__ import annotations

import torch

from .prepare import Prepared
from .quantizer import dequantize, find_params, quantize


def gptq_sweep_reference(prep: Prepared, bits: int, group_size: int, sym: bool, mse: bool):
    """The column sweep. Returns ``codes`` [N, K] (float, processing order) and, for dynamic groups,
    ``scales``/``zeros`` [N, G] with group k = processing positions k·g … (k+1)·g − 1 (else None)."""
    W = prep.W
    N, K = W.shape
    maxq = 2**bits - 1
    U, P = prep.U, prep.P
    codes = torch.zeros_like(W)
    precomputed = prep.static_scale is not None
    scales = zeros = None
    if not precomputed:
        scales = torch.zeros(N, K // group_size, dtype=W.dtype, device=W.device)
        zeros = torch.zeros_like(scales)
    scale = zero = None
    for i1 in range(0, K, prep.block_size):
        i2 = min(i1 + prep.block_size, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Wq1 = torch.zeros_like(W1)  # column values at quantization time (GPTAQ)
        for i in range(i2 - i1):
            col = i1 + i
            if precomputed:
                gi = int(prep.group_of_pos[col])
                scale, zero = prep.static_scale[:, gi], prep.static_zero[:, gi]
            elif col % group_size == 0:
                scale, zero = find_params(W1[:, i : i + group_size], bits, sym, mse)
                scales[:, col // group_size], zeros[:, col // group_size] = scale, zero
            w = W1[:, i].clone()
            q = quantize(w[:, None], scale, zero, maxq)[:, 0]
            codes[:, col] = q
            err = (w - dequantize(q[:, None], scale, zero)[:, 0]) / U[col, col]
            W1[:, i:] -= err[:, None] * U[col, col:i2][None, :]
            if P is not None:
                W1[:, i:] += w[:, None] * P[col, col:i2][None, :]
            Err1[:, i] = err
            Wq1[:, i] = w
        if i2 < K:
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]
            if P is not None:
                W[:, i2:] += Wq1 @ P[i1:i2, i2:]
    return codes, scales, zeros
