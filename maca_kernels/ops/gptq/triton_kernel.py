"""Triton kernel for the GPTQ / GPTAQ column sweep, one launch per column block.

Rows of W are independent given ``U`` (and ``P``), so each program owns BLOCK_N rows and walks the
block's columns in registers: find the group's parameters when a dynamic group starts, quantize the
column, ``err = (w − q)/U_ii``, rank-1 update of the rest of the block (GPTAQ: plus ``w ⊗ P_i,:``).
It writes the codes, the new groups' scales/zeros, and the block's ``Err`` and ``W_blk`` (values at
quantization time); the lazy update of the later columns is then one GEMM per term in the launcher.
Several problems of one shape (a layer's experts) run in one launch per block: the grid's second axis picks
the problem, whose tensors lie ``batch_*`` elements apart; each row's arithmetic is the single problem's.
Arithmetic mirrors ``quantizer.py`` exactly: IEEE division (``div_rn``), round-half-even, scales
rounded to fp16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton_utils import INTERPRETING
from .prepare import Prepared
from .quantizer import mse_shrink_factors

MAGIC_ROUND = tl.constexpr(12582912.0)  # 1.5·2²³: (x + M) − M rounds an fp32 |x| < 2²² to the nearest even integer


@triton.jit
def _rint(x):
    return (x + MAGIC_ROUND) - MAGIC_ROUND


@triton.jit
def _round_scale(s):
    s = tl.maximum(s, 5.960464477539063e-08).to(tl.float16).to(tl.float32)  # at least 2⁻²⁴
    return tl.minimum(s, 65536.0)  # an fp16 overflow (inf) as 2¹⁶, as quantizer.round_scale


@triton.jit
def _scale_zero(xmin, xmax, MAXQ: tl.constexpr, SYM: tl.constexpr):
    scale = _round_scale(tl.math.div_rn(xmax - xmin, tl.full(xmin.shape, MAXQ, tl.float32)))
    if SYM:
        zero = tl.full(xmin.shape, (MAXQ + 1) // 2, tl.float32)
    else:
        zero = _rint(tl.math.div_rn(-xmin, scale))
        at_zero = zero < 1.0  # a v1 checkpoint cannot store a zero of 0
        scale = tl.where(at_zero, _round_scale(tl.math.div_rn(xmax, tl.full(xmin.shape, MAXQ - 1, tl.float32))),
                         scale)
        zero = tl.minimum(tl.where(at_zero, 1.0, zero), MAXQ)
    return scale, zero


@triton.jit
def _quantize(x, scale, zero, MAXQ: tl.constexpr):
    return tl.minimum(tl.maximum(_rint(tl.math.div_rn(x, scale)) + zero, 0.0), MAXQ)


@triton.jit
def _gptq_block_kernel(
    w_ptr,  # [N, K] fp32 working weights (processing order); the block is read, not written
    u_ptr,  # [K, K] fp32 upper Cholesky factor of H⁻¹
    p_ptr,  # [K, K] fp32 GPTAQ matrix (read only when GPTAQ)
    codes_ptr,  # [N, K] int32 out (processing order)
    scales_ptr,  # [N, G] fp32: out for dynamic groups, in for precomputed ones
    zeros_ptr,  # [N, G] fp32, same
    err_ptr,  # [N, BLOCK_K] fp32 out: Err of the block
    wq_ptr,  # [N, BLOCK_K] fp32 out: column values at quantization time (GPTAQ)
    gpos_ptr,  # [K] int32: group of each processing position (precomputed groups)
    shrink_ptr,  # [N_GRID] fp32 MSE range multipliers
    i1,
    count,
    N,
    stride_w,
    stride_u,
    stride_s,
    stride_e,
    batch_w,  # elements between consecutive problems' W / codes (0 for one problem)
    batch_u,  # ... U / P
    batch_s,  # ... scales / zeros
    batch_e,  # ... err / wq
    batch_g,  # ... gpos
    MAXQ: tl.constexpr,
    GROUP: tl.constexpr,  # dynamic group size (0: parameters are precomputed)
    SYM: tl.constexpr,
    N_GRID: tl.constexpr,  # 0: plain min/max; else the MSE grid search
    NORM: tl.constexpr,
    GPTAQ: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    w_ptr += b * batch_w
    codes_ptr += b * batch_w
    u_ptr += b * batch_u
    p_ptr += b * batch_u
    scales_ptr += b * batch_s
    zeros_ptr += b * batch_s
    err_ptr += b * batch_e
    wq_ptr += b * batch_e
    gpos_ptr += b * batch_g
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    cols = tl.arange(0, BLOCK_K)
    cmask = cols < count
    tile_mask = rmask[:, None] & cmask[None, :]
    wb = tl.load(w_ptr + rows[:, None] * stride_w + (i1 + cols)[None, :], mask=tile_mask, other=0.0)
    err_tile = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    wq_tile = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    q_tile = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    scale = tl.full((BLOCK_N,), 1.0, tl.float32)
    zero = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in range(0, count):
        col = i1 + i
        sel = cols[None, :] == i
        if GROUP == 0:
            g = tl.load(gpos_ptr + col)
            scale = tl.load(scales_ptr + rows * stride_s + g, mask=rmask, other=1.0)
            zero = tl.load(zeros_ptr + rows * stride_s + g, mask=rmask, other=0.0)
        elif i % GROUP == 0:  # a dynamic group starts: its columns in this block are up to date
            in_group = ((cols >= i) & (cols < i + GROUP))[None, :]
            xmin = tl.min(tl.where(in_group, wb, 0.0), axis=1)  # 0 is always inside the range
            xmax = tl.max(tl.where(in_group, wb, 0.0), axis=1)
            if SYM:
                xmax = tl.maximum(-xmin, xmax)
                xmin = tl.where(xmin < 0.0, -xmax, xmin)
            empty = (xmin == 0.0) & (xmax == 0.0)
            xmin = tl.where(empty, -1.0, xmin)
            xmax = tl.where(empty, 1.0, xmax)
            scale, zero = _scale_zero(xmin, xmax, MAXQ, SYM)
            if N_GRID > 0:
                best = tl.full((BLOCK_N,), float("inf"), tl.float32)
                for step in range(N_GRID):
                    p = tl.load(shrink_ptr + step)
                    s1, z1 = _scale_zero(p * xmin, p * xmax, MAXQ, SYM)
                    dq = (_quantize(wb, s1[:, None], z1[:, None], MAXQ) - z1[:, None]) * s1[:, None]
                    e = tl.abs(dq - wb)
                    e = tl.where(in_group & (e > 0.0), tl.exp2(NORM * tl.log2(tl.maximum(e, 1e-30))), 0.0)
                    e = tl.sum(e, axis=1)
                    better = e < best
                    best = tl.where(better, e, best)
                    scale = tl.where(better, s1, scale)
                    zero = tl.where(better, z1, zero)
            grp = col // GROUP
            tl.store(scales_ptr + rows * stride_s + grp, scale, mask=rmask)
            tl.store(zeros_ptr + rows * stride_s + grp, zero, mask=rmask)
        w = tl.sum(tl.where(sel, wb, 0.0), axis=1)
        q = _quantize(w, scale, zero, MAXQ)
        d = tl.load(u_ptr + col.to(tl.int64) * stride_u + col)
        err = tl.math.div_rn(w - (q - zero) * scale, tl.full(w.shape, 1.0, tl.float32) * d)
        # U is upper triangular: entries left of the diagonal are 0, so the update leaves them alone.
        u_row = tl.load(u_ptr + col.to(tl.int64) * stride_u + i1 + cols, mask=cmask, other=0.0)
        wb -= err[:, None] * u_row[None, :]
        if GPTAQ:
            p_row = tl.load(p_ptr + col.to(tl.int64) * stride_u + i1 + cols, mask=cmask, other=0.0)
            wb += w[:, None] * p_row[None, :]
            wq_tile = tl.where(sel, w[:, None], wq_tile)
        err_tile = tl.where(sel, err[:, None], err_tile)
        q_tile = tl.where(sel, q[:, None], q_tile)
    tl.store(codes_ptr + rows[:, None] * stride_w + (i1 + cols)[None, :], q_tile.to(tl.int32), mask=tile_mask)
    tl.store(err_ptr + rows[:, None] * stride_e + cols[None, :], err_tile, mask=tile_mask)
    if GPTAQ:
        tl.store(wq_ptr + rows[:, None] * stride_e + cols[None, :], wq_tile, mask=tile_mask)


# No FMA contraction: ``w − q·s`` and the rank-1 update stay two roundings each, as in the reference
# (and the C++ sweep, built with -ffp-contract=off), so the codes agree bit for bit.
SWEEP_OPTIONS = {"enable_fp_fusion": False}


def launch_config(block_k: int, interpreting: bool = INTERPRETING) -> tuple[int, int]:
    """(rows per program, num_warps): 2048 tile elements keep the four register tiles spill-free on
    sm_90 (checked by the compile tier); the interpreter pays per program, so it takes more rows."""
    rows = max(1, (16384 if interpreting else 2048) // block_k)
    return rows, 4 if block_k <= 128 else 8


def gptq_sweep_triton(prep: Prepared, bits: int, group_size: int, sym: bool, mse: bool):
    """Same contract as ``reference.gptq_sweep_reference`` (codes as int32)."""
    return gptq_sweep_triton_batched([prep], bits, group_size, sym, mse)[0]


def _stacked(ts: list[torch.Tensor]) -> torch.Tensor:
    """[B, ...] contiguous; one tensor is viewed, not copied (a K = 8192 factor is 268 MB)."""
    return (ts[0].unsqueeze(0) if len(ts) == 1 else torch.stack(ts)).contiguous()


def gptq_sweep_triton_batched(preps: list[Prepared], bits: int, group_size: int, sym: bool, mse: bool):
    """``gptq_sweep_triton`` of several problems of one shape and one mode (one launch per column block for all;
    the lazy updates stay one GEMM per problem, with the single problem's operand layouts, so every problem gets
    the bits it gets alone). Returns [(codes, scales, zeros)] in order."""
    p0, B = preps[0], len(preps)
    N, K = p0.W.shape
    dev = p0.W.device
    block_k = triton.next_power_of_2(p0.block_size)
    block_n, num_warps = launch_config(block_k)
    precomputed = p0.static_scale is not None
    gptaq = p0.P is not None
    W = _stacked([p.W for p in preps])  # one problem: its own tensor, updated in place as before
    G = p0.static_scale.shape[1] if precomputed else K // group_size
    if precomputed:
        scales = _stacked([p.static_scale for p in preps])
        zeros = _stacked([p.static_zero for p in preps])
    else:
        scales = torch.empty(B, N, G, dtype=torch.float32, device=dev)
        zeros = torch.empty_like(scales)
    codes = torch.empty(B, N, K, dtype=torch.int32, device=dev)
    err_buf = torch.empty(B, N * block_k, dtype=torch.float32, device=dev)
    wq_buf = torch.empty_like(err_buf) if gptaq else err_buf
    gpos = _stacked([p.group_of_pos.to(torch.int32) for p in preps])
    shrink = mse_shrink_factors(device=dev) if mse else torch.ones(1, device=dev)
    U = _stacked([p.U for p in preps])
    P = _stacked([p.P for p in preps]) if gptaq else U
    grid = (triton.cdiv(N, block_n), B)
    for i1 in range(0, K, p0.block_size):
        i2 = min(i1 + p0.block_size, K)
        # [N, count] contiguous, like the reference's Err1/Wq1: the lazy GEMMs below then see the same
        # operand layouts as the reference's and round the same way
        err = [err_buf[b, : N * (i2 - i1)].view(N, i2 - i1) for b in range(B)]
        wq = [wq_buf[b, : N * (i2 - i1)].view(N, i2 - i1) for b in range(B)]
        _gptq_block_kernel[grid](
            W, U, P, codes, scales, zeros, err_buf, wq_buf, gpos, shrink,
            i1, i2 - i1, N, W.stride(1), U.stride(1), scales.stride(1), i2 - i1,
            W.stride(0), U.stride(0), scales.stride(0), err_buf.stride(0), gpos.stride(0),
            MAXQ=2**bits - 1, GROUP=0 if precomputed else group_size, SYM=sym,
            N_GRID=shrink.numel() if mse else 0, NORM=2.4, GPTAQ=gptaq,
            BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, **SWEEP_OPTIONS,
        )
        if i2 < K:  # written as the reference writes it (a product, then a subtraction: two roundings)
            for b in range(B):
                W[b, :, i2:] -= err[b] @ U[b, i1:i2, i2:]
                if gptaq:
                    W[b, :, i2:] += wq[b] @ P[b, i1:i2, i2:]
    return [(codes[b], None if precomputed else scales[b], None if precomputed else zeros[b]) for b in range(B)]


def aot_variants():
    """For the compile tier: every bit width × group mode × option, launched the way
    ``gptq_sweep_triton`` launches a middle column block of a 4096 × 4096 layer (block_size 128, or 256
    for 256-column groups). The tier derives signature and alignment from these values with the JIT's
    own rules (a per-channel scale table has stride 1, which the JIT turns into a constexpr)."""
    from ..._aot import AotTensor, Variant

    N = K = 4096
    n_grid = mse_shrink_factors().numel()
    modes = [  # (tag, group_size (-1: one group), precomputed, sym, mse, gptaq, block_size)
        ("g128", 128, False, False, False, False, 128), ("g128_sym", 128, False, True, False, False, 128),
        ("g32", 32, False, False, False, False, 128), ("g256", 256, False, False, False, False, 256),
        ("static_g128", 128, True, False, False, False, 128), ("perchannel", -1, True, True, False, False, 128),
        ("g128_mse", 128, False, False, True, False, 128), ("g128_gptaq", 128, False, False, False, True, 128),
        ("g128_mse_gptaq", 128, False, False, True, True, 128),
    ]
    for bits in (2, 3, 4, 8):
        for tag, group_size, precomputed, sym, mse, gptaq, block_size in modes:
            block_k = triton.next_power_of_2(block_size)
            block_n, num_warps = launch_config(block_k, interpreting=False)
            g = group_size if group_size > 0 else K
            W, U = AotTensor(torch.float32, N, K), AotTensor(torch.float32, K, K)
            P = AotTensor(torch.float32, K, K) if gptaq else U
            scales = AotTensor(torch.float32, N, K // g)
            err = AotTensor(torch.float32, N, block_size)  # [N, count] views of one flat buffer
            wq = AotTensor(torch.float32, N, block_size) if gptaq else err
            shrink = AotTensor(torch.float32, n_grid if mse else 1)
            i1 = block_size  # a middle block (every block starts at a multiple of block_size)
            args = (W, U, P, AotTensor(torch.int32, N, K), scales, scales, err, wq, AotTensor(torch.int32, K), shrink,
                    i1, block_size, N, W.stride(0), U.stride(0), scales.stride(0), err.stride(0),
                    N * K, K * K, N * (K // g), N * block_k, K)  # between experts of a batched launch
            kwargs = dict(MAXQ=2**bits - 1, GROUP=0 if precomputed else group_size, SYM=sym,
                          N_GRID=n_grid if mse else 0, NORM=2.4, GPTAQ=gptaq, BLOCK_N=block_n, BLOCK_K=block_k,
                          num_warps=num_warps, **SWEEP_OPTIONS)
            yield Variant(f"gptq_block_{bits}b_{tag}", _gptq_block_kernel, args, kwargs)
