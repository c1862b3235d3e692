"""Triton kernels for ``y = x @ dequant(W)ᵀ`` straight from GPTQ checkpoint tensors (2/3/4/8 bits).

One kernel body, three schedules picked by the number of rows M (like gemlite):
- GEMV (M = 1): CUDA-core dot per output column, split-K so every SM streams its share of the
  packed weight once; partial sums meet in an fp32 buffer with atomic adds;
- small M (≤ 64): tensor-core tiles of 16 rows, split-K, fp32 atomics;
- large M: plain tensor-core GEMM tiles, stored straight in the output dtype.

Decoding: value k of a column sits at bit ``(k mod 32)·bits`` of the 32-value run that starts at word
``(k // 32)·bits`` (for 2/4/8 bits this is just word ``k·bits/32``); a 3-bit value may straddle two
words, so the next word is read for those lanes. Without act-order a K-tile lies inside one group, so
the tile is multiplied as exact small integers ``code − zero`` and the group's scale is applied to the
fp32 partial sum: the weights never round to fp16/bf16. With a ``g_idx`` the scale is applied per
element before the dot.

The same schedules run on the CUDA GEMV's mma layout (``launch_mma_matmul``, ``mma_layout.py``): a K-tile of
whole 128-bit loads is decoded in the order its words unpack (rows and columns permuted within the tile), x is
read and y written in that same order, so each word is loaded once and the layer needs no second copy.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..._triton_utils import INTERPRETING, TUNE_QUICK


@triton.jit
def _field(lo, hi, shift, BITS: tl.constexpr):
    """The ``BITS``-bit field at bit ``shift`` of the stream lo|hi (int32 words, uint32 shifts)."""
    val = lo.to(tl.uint32, bitcast=True) >> shift
    if BITS == 3:  # fields at bits 30 and 31 continue in the next word
        spill = hi.to(tl.uint32, bitcast=True) << ((32 - shift) & 31)
        val = val | tl.where(shift > 29, spill, 0)
    return (val & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _unpack_tile(qw_ptr, k0, offs_n, mask_n, K, stride_qw, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Codes [BLOCK_K, BLOCK_N] (int32) of rows k0 … k0+BLOCK_K of W, loading each packed word once."""
    if BITS == 3:  # 32 values in 3 words: load the three word planes of each run
        RUNS: tl.constexpr = BLOCK_K // 32
        run = k0 // 32 + tl.arange(0, RUNS)
        m = (run < K // 32)[:, None] & mask_n[None, :]
        base = qw_ptr + (run * 3)[:, None].to(tl.int64) * stride_qw + offs_n[None, :]
        w0 = tl.load(base, mask=m, other=0, eviction_policy="evict_first").to(tl.uint32, bitcast=True)
        w1 = tl.load(base + stride_qw, mask=m, other=0, eviction_policy="evict_first").to(tl.uint32, bitcast=True)
        w2 = tl.load(base + 2 * stride_qw, mask=m, other=0, eviction_policy="evict_first").to(tl.uint32, bitcast=True)
        v = tl.arange(0, 32)
        word = ((v * 3) // 32)[None, :, None]
        shift = ((v * 3) % 32).to(tl.uint32)[None, :, None]
        lo = tl.where(word == 0, w0[:, None, :], tl.where(word == 1, w1[:, None, :], w2[:, None, :]))
        hi = tl.where(word == 0, w1[:, None, :], w2[:, None, :])
        val = (lo >> shift) | tl.where(shift > 29, hi << ((32 - shift) & 31), 0)
        codes = tl.reshape(val & 7, (BLOCK_K, offs_n.shape[0]))
    else:
        PER_WORD: tl.constexpr = 32 // BITS
        row = k0 // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)
        m = (row < K // PER_WORD)[:, None] & mask_n[None, :]
        words = tl.load(qw_ptr + row[:, None].to(tl.int64) * stride_qw + offs_n[None, :], mask=m, other=0,
                        eviction_policy="evict_first").to(tl.uint32, bitcast=True)
        shift = (tl.arange(0, PER_WORD) * BITS).to(tl.uint32)[None, :, None]
        val = (words[:, None, :] >> shift) & ((1 << BITS) - 1)
        codes = tl.reshape(val, (BLOCK_K, offs_n.shape[0]))
    return codes.to(tl.int32)


@triton.jit
def _mma_rows(BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """k offset (from the tile's first k) of each row of a tile decoded from the mma layout: the rows come in the
    order the words unpack (see _load_mma_tile), x is read in the same order. Slot 16u + 8h + 2t + e of a tile
    pair holds feature 8t + 4u + 2h + e (mma_layout.FEATURE): written so that the runs of contiguous features
    (4 at int4, 8 below) end in ``r % 4`` / ``r % 8``, which Triton's analysis sees (vector loads of x)."""
    r = tl.arange(0, BLOCK_K)
    if BITS == 4:  # rows (c, j, t, h, e): load c, word j = 2 (pair) + u, lane t, field (h, e)
        return 64 * (r // 64) + 32 * ((r // 32) % 2) + 4 * ((r // 16) % 2) + 8 * ((r // 4) % 4) + r % 4
    # rows (c, jh, t, a, u, h, e): word j = 2 jh + a of load c (the order of the int3 high-bits words)
    return 128 * (r // 128) + 64 * ((r // 64) % 2) + 8 * ((r // 16) % 4) + 32 * ((r // 8) % 2) + r % 8


@triton.jit
def _mma_cols(BLOCK_N: tl.constexpr):
    """n offset (from the tile's first column) of each column of a tile decoded from the mma layout:
    columns (16-column tile, g, rn) hold n = 16 tile + 8 rn + g (a word's two columns are g and g + 8)."""
    c = tl.arange(0, BLOCK_N)
    return 16 * (c // 16) + 8 * (c % 2) + (c // 2) % 8


@triton.jit
def _mma_word_offsets(n0, N, K, HIGH: tl.constexpr, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """Where a K-tile's words lie, computed once per CTA: (offsets [rows of words, BLOCK_N / 2] from the CTA's
    first 16-column tile at k = 0, the 128-bit load ``c`` of each row of words, the columns' mask). Rows of
    words are (c, j, t) at int4 and (c, jh, t, a) below (word j = 2 jh + a); ``HIGH``: int3's high-bit words,
    rows (c, jh, t) (two words per 128 k, one per 64). Columns are (tile, g)."""
    VEC: tl.constexpr = 64 if BITS == 4 else 128
    PER: tl.constexpr = 2 if HIGH else 4  # words per lane per load
    ROWS: tl.constexpr = BLOCK_K // 16 if HIGH else BLOCK_K // (4 if BITS == 4 else 8)
    wk = tl.arange(0, ROWS)
    wn = tl.arange(0, BLOCK_N // 2)
    if HIGH:
        c, j, t = wk // 8, (wk // 4) % 2, wk % 4
    elif BITS == 4:
        c, j, t = wk // 16, (wk // 4) % 4, wk % 4
    else:
        c, j, t = wk // 16, 2 * ((wk // 8) % 2) + wk % 2, (wk // 2) % 4
    lane = 4 * (wn % 8)[None, :] + t[:, None]
    off = ((wn // 8)[None, :] * (K // VEC) + c[:, None]) * (32 * PER) + lane * PER + j[:, None]
    return off, c, (n0 + 16 * (wn // 8)) < N


@triton.jit
def _load_mma_tile(w_base, hw_base, w_off, w_c, hw_off, hw_c, n_ok, k0, K, BITS: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Codes [BLOCK_K, BLOCK_N] of the mma layout (mma_layout.py) at rows k0 + _mma_rows, columns n0 +
    _mma_cols, loading each word once (offsets from _mma_word_offsets; k0 a multiple of the 128-bit load's k)."""
    VEC: tl.constexpr = 64 if BITS == 4 else 128
    FIELDS: tl.constexpr = 4 if BITS == 4 else 8  # values per word and column
    c0 = k0 // VEC
    words = tl.load(w_base + c0 * 128 + w_off, mask=((c0 + w_c) < K // VEC)[:, None] & n_ok[None, :], other=0,
                    eviction_policy="evict_first")
    f = tl.arange(0, FIELDS)[:, None]  # (rk, e) at int4, (u, rk, e) below
    rn = tl.arange(0, 2)[None, :]
    if BITS == 4:
        shift = 8 * (f // 2) + 16 * (f % 2) + 4 * rn
    else:
        shift = 8 * (f // 4) + 4 * ((f // 2) % 2) + 16 * (f % 2) + 2 * rn
    val = (words.to(tl.uint32, bitcast=True)[:, None, :, None] >> shift.to(tl.uint32)[None, :, None, :])
    val = val & (15 if BITS == 4 else 3)
    if BITS == 3:  # the high bits: word jh of load c holds words (jh, a = 0, 1)'s, fields (a, u, rk, e)
        hw = tl.load(hw_base + c0 * 64 + hw_off, mask=((c0 + hw_c) < K // VEC)[:, None] & n_ok[None, :], other=0,
                     eviction_policy="evict_first")
        hf = tl.arange(0, 16)[:, None]
        hshift = (hf // 8) + 8 * ((hf // 4) % 2) + 4 * ((hf // 2) % 2) + 16 * (hf % 2) + 2 * rn
        high = (hw.to(tl.uint32, bitcast=True)[:, None, :, None] >> hshift.to(tl.uint32)[None, :, None, :]) & 1
        val = val | tl.reshape(high, (BLOCK_K // 8, 8, BLOCK_N // 2, 2)) << 2
    return tl.reshape(val, (BLOCK_K, BLOCK_N)).to(tl.int32)


@triton.jit
def _zero_points(qz_ptr, row, offs_n, z_word, z_shift, mask, BITS: tl.constexpr, MMA: tl.constexpr):
    """Zero points of columns ``offs_n`` at zeros row offset ``row``: packed along N like the weights along K
    (GPTQ), or one uint8 each (mma layout)."""
    if MMA:
        zero = tl.load(qz_ptr + row + offs_n, mask=mask, other=0).to(tl.int32)
    else:
        z_ptrs = qz_ptr + row + z_word
        zlo = tl.load(z_ptrs, mask=mask, other=0)
        zhi = zlo
        if BITS == 3:
            zhi = tl.load(z_ptrs + 1, mask=mask & (z_shift > 29), other=0)
        zero = _field(zlo, zhi, z_shift, BITS)
    return zero


@triton.jit
def _quant_matmul_kernel(
    x_ptr, qw_ptr, hw_ptr, scales_ptr, qz_ptr, gidx_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_qw, stride_s, stride_qz, stride_ym,
    m_bucket,  # only an autotune key
    BITS: tl.constexpr,
    ZERO_OFFSET: tl.constexpr,  # 1 for the v1 "gptq" convention (stored zero − 1), 0 for v2 and the mma layout
    GROUP: tl.constexpr,  # group size (K for a single group); tiles never straddle groups without g_idx
    HAS_GIDX: tl.constexpr,
    MMA: tl.constexpr,  # the CUDA GEMV's mma layout (hw_ptr: int3 high bits) instead of GPTQ tensors
    GEMV: tl.constexpr,
    ATOMIC: tl.constexpr,  # split-K partial sums into an fp32 buffer
    UPCAST: tl.constexpr,  # the interpreter multiplies raw bf16 bits in tl.dot: use fp32 there
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # scales per element: with a g_idx, and on the mma layout when groups are shorter than the K-tile
    PER_ELEMENT: tl.constexpr = HAS_GIDX or GROUP < BLOCK_K
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if MMA:  # the tile's columns in the order its words unpack, which is the order scales and zeros are stored in
        offs_n = pid_n * BLOCK_N + _mma_cols(BLOCK_N)
        offs_s = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # stored [tile][group][16]: stride_s = 16 per group
        offs_s = offs_s // 16 * ((K // GROUP) * 16) + offs_s % 16
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_s = offs_n
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_span = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_begin = pid_k * k_span
    k_end = tl.minimum(K, k_begin + k_span)

    # zero-point fields of this tile's columns (packed along N like the weights along K)
    z_word = (offs_n // 32) * BITS + ((offs_n % 32) * BITS) // 32
    z_shift = (((offs_n % 32) * BITS) % 32).to(tl.uint32)
    if MMA:  # where the words lie (the same in every K-tile, from the CTA's first 16-column tile on)
        VEC: tl.constexpr = 64 if BITS == 4 else 128
        first_tile = (pid_n * (BLOCK_N // 16)).to(tl.int64) * (K // VEC)
        w_base = qw_ptr + first_tile * 128
        hw_base = hw_ptr + first_tile * 64
        w_off, w_c, n_ok = _mma_word_offsets(pid_n * BLOCK_N, N, K, False, BITS, BLOCK_K, BLOCK_N)
        hw_off, hw_c, _ = _mma_word_offsets(pid_n * BLOCK_N, N, K, True, BITS, BLOCK_K, BLOCK_N)
        rows = _mma_rows(BITS, BLOCK_K)

    if GEMV:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        if MMA:  # rows in the order the words unpack: x is read in that order too
            offs_k = k0 + rows
            codes = _load_mma_tile(w_base, hw_base, w_off, w_c, hw_off, hw_c, n_ok, k0, K, BITS, BLOCK_K, BLOCK_N)
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            codes = _unpack_tile(qw_ptr, k0, offs_n, mask_n, K, stride_qw, BITS, BLOCK_K)
        mask_k = offs_k < k_end
        tile_mask = mask_k[:, None] & mask_n[None, :]
        if PER_ELEMENT:
            if HAS_GIDX:
                g = tl.load(gidx_ptr + offs_k, mask=mask_k, other=0)
            else:
                g = offs_k // GROUP
            scale = tl.load(scales_ptr + g[:, None].to(tl.int64) * stride_s + offs_s[None, :], mask=tile_mask,
                            other=0.0).to(tl.float32)
            zero = _zero_points(qz_ptr, g[:, None].to(tl.int64) * stride_qz, offs_s[None, :], z_word[None, :],
                                z_shift[None, :], tile_mask, BITS, MMA) + ZERO_OFFSET
            w = (codes - zero).to(tl.float32) * scale  # [BLOCK_K, BLOCK_N]
        else:
            g = k0 // GROUP
            scale = tl.load(scales_ptr + g * stride_s + offs_s, mask=mask_n, other=0.0).to(tl.float32)
            zero = _zero_points(qz_ptr, g * stride_qz, offs_s, z_word, z_shift, mask_n, BITS, MMA) + ZERO_OFFSET
            w = (codes - zero[None, :])  # exact small integers; the scale is applied after the dot
        if GEMV:
            x = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            part = tl.sum(x[:, None] * w.to(tl.float32), axis=0)
            if PER_ELEMENT:
                acc += part
            else:
                acc += part * scale
        else:
            x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0, eviction_policy="evict_last")
            if UPCAST:
                part = tl.dot(x.to(tl.float32), w.to(tl.float32))
            else:
                part = tl.dot(x, w.to(x.dtype))
            if PER_ELEMENT:
                acc += part
            else:
                acc += part * scale[None, :]

    if GEMV:
        y_ptrs = y_ptr + offs_n
        out_mask = mask_n
    else:
        y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
        out_mask = mask_m[:, None] & mask_n[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptrs, acc, mask=out_mask, sem="relaxed")
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


def _cfg(bm, bn, bk, split, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split},
                         num_warps=warps, num_stages=stages)


# (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) per schedule; none spills on sm_90 (the
# compile tier checks). The g_idx path gathers scale/zero per element and needs small tiles: only the
# tiles in GIDX_TILES serve it. Every list holds SPLIT_K = 1 configs (deterministic=True) and a
# GIDX tile; the QUICK lists (MACA_KERNELS_TUNE=quick, for a time-boxed GPU session) keep both.
GEMV_CONFIGS = [(1, bn, bk, s, 4, 2) for bn, bk in ((128, 64), (256, 32), (64, 64), (128, 32)) for s in (1, 2, 4, 8)]
SMALL_M_CONFIGS = [(16, bn, bk, s, 4, 3) for bn, bk in ((128, 64), (64, 128), (128, 128), (64, 64), (128, 32))
                   for s in (1, 2, 4)]
# BLOCK_K 64 / 128 apply the group scale (and wait for the tensor cores) once per 4 / 8 k-steps instead of 2
LARGE_M_CONFIGS = [(64, 128, 32, 1, 4, 3), (64, 64, 32, 1, 4, 4), (128, 128, 32, 1, 8, 4),
                   (128, 128, 64, 1, 8, 3), (128, 128, 128, 1, 8, 3), (64, 128, 128, 1, 4, 3)]
GIDX_TILES = {(1, 64, 64), (1, 128, 32), (16, 64, 64), (16, 128, 32), (64, 64, 32), (128, 128, 32)}
# With a plain store epilogue ptxas squeezes 16×128×32 into 80 registers and spills on sm_90 (compile tier)
GIDX_TILES_NO_ATOMIC = GIDX_TILES - {(16, 128, 32)}
QUICK_CONFIGS = {
    "gemv": [(1, 128, 64, s, 4, 2) for s in (1, 4, 8)] + [(1, 128, 32, s, 4, 2) for s in (1, 4)],
    "small": [(16, 128, 64, s, 4, 3) for s in (1, 4)] + [(16, 128, 32, s, 4, 3) for s in (1, 2)]
    + [(16, 64, 64, 1, 4, 3)],
    "large": [(64, 128, 32, 1, 4, 3), (128, 128, 32, 1, 8, 4), (128, 128, 128, 1, 8, 3)],
}
# The interpreter cannot autotune: the launcher takes the first config that fits, without tuning.
INTERPRETER_CONFIGS = {
    "gemv": [(1, 32, 32, 2, 4, 1), (1, 32, 32, 1, 4, 1)],
    "small": [(16, 32, 32, 2, 4, 1), (16, 32, 32, 1, 4, 1)],
    "large": [(32, 32, 32, 1, 4, 1)],
}
FULL_CONFIGS = {"gemv": GEMV_CONFIGS, "small": SMALL_M_CONFIGS, "large": LARGE_M_CONFIGS}
# The mma layout (mma_layout.py) decodes whole 128-bit loads per K-tile: BLOCK_K a multiple of 64 (int4) or
# 128 (int3 / int2). Its small-M and large-M schedules serve batches above the CUDA GEMV's 16 rows; its GEMV
# and small-M schedules also serve 1–16 rows where the CUDA GEMV cannot compile (no NVRTC or CUDA_HOME).
# int4 groups of 32 take the per-element scale path (GROUP < BLOCK_K).
MMA_CONFIGS = {
    "gemv": [(1, 64, 128, s, 4, 2) for s in (1, 4, 8)] + [(1, 128, 64, s, 4, 2) for s in (1, 4, 8)],
    "small": [(16, bn, bk, s, 4, 3) for bn, bk in ((64, 128), (128, 128), (128, 64)) for s in (1, 2, 4)],
    "large": [(64, 128, 128, 1, 8, 3), (64, 64, 128, 1, 4, 3), (128, 128, 64, 1, 8, 3)],
}
MMA_QUICK_CONFIGS = {  # MACA_KERNELS_TUNE=quick: a SPLIT_K = 1 config of each BLOCK_K in every schedule
    "gemv": [(1, 64, 128, 4, 4, 2), (1, 64, 128, 1, 4, 2), (1, 128, 64, 1, 4, 2)],
    "small": [(16, 64, 128, 2, 4, 3), (16, 64, 128, 1, 4, 3), (16, 128, 64, 1, 4, 3)],
    "large": [(64, 128, 128, 1, 8, 3), (128, 128, 64, 1, 8, 3)],
}
# Tiles that spill on sm_90 (the compile tier): 16 x 128 x 128 at int4 (168 registers of codes and scales) and
# int2 (12 bytes since x is read in runs of 8 features); with groups shorter than the K-tile (per-element
# scales), the GEMV's 128 x 64
MMA_SPILLS = {4: {(16, 128, 128)}, 2: {(16, 128, 128)}}
MMA_PER_ELEMENT_SPILLS = {(1, 128, 64)}
MMA_INTERPRETER_CONFIGS = {  # BLOCK_K 64: int4 with one group of an odd multiple of 64 rows
    "gemv": [(1, 32, bk, s, 4, 1) for bk in (128, 64) for s in (2, 1)],
    "small": [(16, 32, bk, s, 4, 1) for bk in (128, 64) for s in (2, 1)],
    "large": [(32, 32, bk, 1, 4, 1) for bk in (128, 64)],
}
SMALL_M_MAX = 64


def configs_for(schedule: str, mma: bool = False) -> list[tuple]:
    if mma:
        return (MMA_INTERPRETER_CONFIGS if INTERPRETING else MMA_QUICK_CONFIGS if TUNE_QUICK else MMA_CONFIGS)[schedule]
    if INTERPRETING:
        return INTERPRETER_CONFIGS[schedule]
    return QUICK_CONFIGS[schedule] if TUNE_QUICK else FULL_CONFIGS[schedule]


def fits(cfg: tuple, group: int, has_gidx: bool, atomic: bool, interpreting: bool = INTERPRETING,
         mma_bits: int = 0) -> bool:
    """Without g_idx a K-tile must lie inside one group (one scale per tile); with it, only the small
    tiles fit in registers; without atomics there is no split-K. The mma layout (``mma_bits``) needs K-tiles
    of whole loads, and takes groups shorter than the tile per element."""
    bm, bn, bk, split = cfg[:4]
    if not atomic and split != 1:
        return False
    if mma_bits:
        if has_gidx or (bm, bn, bk) in MMA_SPILLS.get(mma_bits, ()):
            return False
        if group < bk and (bm, bn, bk) in MMA_PER_ELEMENT_SPILLS:
            return False
        return bk % (64 if mma_bits == 4 else 128) == 0 and (group % bk == 0 or bk % group == 0)
    if has_gidx:
        return interpreting or (bm, bn, bk) in (GIDX_TILES if atomic else GIDX_TILES_NO_ATOMIC)
    return group % bk == 0


def _prune(configs, named_args, **kwargs):
    group, gidx, atomic = kwargs["GROUP"], kwargs["HAS_GIDX"], kwargs["ATOMIC"]
    mma_bits = kwargs["BITS"] if kwargs["MMA"] else 0
    kept = [c for c in configs if fits((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"],
                                        c.kwargs["SPLIT_K"]), group, gidx, atomic, mma_bits=mma_bits)]
    if not kept:  # the launcher only launches shapes that some config fits
        raise RuntimeError(f"quant_matmul: no tile config fits GROUP={group}, HAS_GIDX={gidx}, ATOMIC={atomic}, "
                           f"MMA={kwargs['MMA']}")
    return kept


def _tuned(schedule: str, mma: bool):
    return triton.autotune(
        configs=[_cfg(*c) for c in configs_for(schedule, mma)],
        key=["m_bucket", "N", "K", "BITS", "GROUP", "HAS_GIDX", "MMA", "ATOMIC"],
        prune_configs_by={"early_config_prune": _prune},
        restore_value=["y_ptr"] if schedule != "large" else None,  # tuning must not leave partial sums behind
    )(_quant_matmul_kernel)


_KERNELS = {(schedule, mma): _tuned(schedule, mma) for schedule in FULL_CONFIGS for mma in (False, True)}
# Best config per launch key, filled by the first (tuned) launch outside a CUDA graph capture. Later
# launches use it directly, so a capture never runs the autotuner's benchmarks.
_BEST: dict[tuple, triton.Config] = {}


def schedule_for(M: int) -> str:
    return "gemv" if M == 1 else "small" if M <= SMALL_M_MAX else "large"


def _first_fit(schedule: str, group: int, has_gidx: bool, atomic: bool, mma_bits: int = 0) -> triton.Config:
    return _cfg(*next(c for c in configs_for(schedule, bool(mma_bits))
                      if fits(c, group, has_gidx, atomic, mma_bits=mma_bits)))


def _launch(x2, N: int, weights: tuple, strides: tuple, consts: dict, deterministic: bool):
    """Runs the schedule for x2's rows: ``weights`` (qweight or words, high-bits words, scales, zeros, g_idx),
    ``strides`` (of qweight, scales, zeros); returns ``[M, N]`` in x2's dtype."""
    M, K = x2.shape
    schedule = schedule_for(M)
    atomic = schedule != "large" and not deterministic
    y = torch.zeros(M, N, dtype=torch.float32, device=x2.device) if atomic else torch.empty(
        M, N, dtype=x2.dtype, device=x2.device)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    m_bucket = min(triton.next_power_of_2(M), 4096)
    args = (x2, *weights, y, M, N, K, x2.stride(0), *strides, y.stride(0), m_bucket)
    consts = dict(consts, GEMV=schedule == "gemv", ATOMIC=atomic, UPCAST=INTERPRETING and x2.dtype == torch.bfloat16)
    bits, group, has_gidx, mma = consts["BITS"], consts["GROUP"], consts["HAS_GIDX"], consts["MMA"]
    key = (schedule, m_bucket, N, K, bits, group, has_gidx, mma, atomic, x2.dtype, x2.device)
    cfg = _BEST.get(key)
    if cfg is None and (INTERPRETING or torch.cuda.is_current_stream_capturing()):
        cfg = _first_fit(schedule, group, has_gidx, atomic, bits if mma else 0)  # untuned, and not remembered
    if cfg is None:
        kernel = _KERNELS[schedule, mma]
        kernel[grid](*args, **consts)
        _BEST[key] = kernel.best_config
    else:
        _quant_matmul_kernel[grid](*args, **consts, **cfg.all_kwargs())
    return y.to(x2.dtype) if atomic else y


def launch_quant_matmul(x2, qweight, scales, qzeros, g_idx, bits: int, group_size: int, zero_offset: int, *,
                        deterministic: bool = False):
    """``x2 [M, K] @ dequant(W)ᵀ`` → ``[M, N]`` in x2's dtype; inputs already validated."""
    M, K = x2.shape
    if K > 1 and x2.stride(1) != 1:  # the kernel reads rows of x with unit stride
        x2 = x2.contiguous()
    atomic = schedule_for(M) != "large" and not deterministic
    group = K if group_size == -1 else group_size
    has_gidx = g_idx is not None
    if not has_gidx and not any(fits(c, group, False, atomic) for c in configs_for(schedule_for(M))):
        # no K-tile divides the group (16, 48, 80, ...): gather the group per element instead
        g_idx = (torch.arange(K, device=x2.device) // group).to(torch.int32)
        has_gidx = True
    weights = (qweight, qweight, scales, qzeros, g_idx if has_gidx else qweight)
    consts = dict(BITS=bits, ZERO_OFFSET=zero_offset, GROUP=group, HAS_GIDX=has_gidx, MMA=False)
    return _launch(x2, qweight.shape[1], weights, (qweight.stride(0), scales.stride(0), qzeros.stride(0)), consts,
                   deterministic)


def launch_mma_matmul(x2, w, *, deterministic: bool = False):
    """``x2 [M, K] @ dequant(W)ᵀ`` → ``[M, N]`` in x2's dtype from the mma layout (``mma_layout.MmaWeight``
    ``w``), x2 in input order (gathered here by ``w.perm``), any M; fp16 / bf16 x2 on CUDA or under the
    interpreter. The same tensors the CUDA GEMV reads, so a layer keeps one copy of its weight. A
    ``torch.library`` op (fake implementation included): works under torch.compile and in CUDA graphs."""
    return _mma_matmul_op(x2, w.words, w.hwords, w.scales, w.zeros, w.perm, w.bits, w.group_size, w.K, w.N,
                          bool(deterministic))


@torch.library.custom_op("maca_kernels::mma_matmul", mutates_args=())
def _mma_matmul_op(x2: torch.Tensor, words: torch.Tensor, hwords: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor, perm: torch.Tensor | None, bits: int, group_size: int, K: int, N: int,
                   deterministic: bool) -> torch.Tensor:
    if x2.dim() != 2 or x2.shape[1] != K:
        raise ValueError(f"mma_matmul: x must be [M, K] with K = {K}, got {tuple(x2.shape)}")
    if perm is not None:
        x2 = x2.index_select(1, perm)
    elif K > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    consts = dict(BITS=bits, ZERO_OFFSET=0, GROUP=group_size, HAS_GIDX=False, MMA=True)
    with torch.cuda.device(x2.device) if x2.is_cuda else contextlib.nullcontext():  # x may not be on the current GPU
        return _launch(x2, N, (words, hwords if hwords.numel() else words, scales, zeros, words),
                       (K, 16, 16), consts, deterministic)  # scales / zeros: a group's row is 16 apart


@_mma_matmul_op.register_fake
def _(x2, words, hwords, scales, zeros, perm, bits, group_size, K, N, deterministic):
    return x2.new_empty((x2.shape[0], N))


def aot_variants():
    """For the compile tier: every config of every schedule's full list (whatever MACA_KERNELS_TUNE
    says), for 2/3/4/8 bits, sorted and g_idx paths, split-K (atomic) and deterministic launches, as
    ``launch_quant_matmul`` launches them on real layers (K = N = 4096 and K = 8192, N = 28672; M = 1, 16
    and 2048). The tier derives signature and alignment from these values with the JIT's own rules
    (M = 1 becomes a constexpr for the GEMV) and compiles identical specialisations once."""
    from ..._aot import AotTensor, Variant

    group = 128
    shapes = {"4096x4096": (4096, 4096), "8192x28672": (8192, 28672)}  # K x N
    for schedule, configs in FULL_CONFIGS.items():
        M = {"gemv": 1, "small": 16, "large": 2048}[schedule]
        for atomic in ((True, False) if schedule != "large" else (False,)):
            for bits in (2, 3, 4, 8):
                for has_gidx in (False, True):
                    kept = [c for c in configs if fits(c, group, has_gidx, atomic, interpreting=False)]
                    for shape, (K, N) in shapes.items():
                        x = AotTensor(torch.float16, M, K)
                        qweight = AotTensor(torch.int32, K * bits // 32, N)
                        scales = AotTensor(torch.float16, K // group, N)
                        qzeros = AotTensor(torch.int32, K // group, N * bits // 32)
                        g_idx = AotTensor(torch.int32, K) if has_gidx else qweight
                        y = AotTensor(torch.float32 if atomic else x.dtype, M, N)
                        args = (x, qweight, qweight, scales, qzeros, g_idx, y, M, N, K, x.stride(0), qweight.stride(0),
                                scales.stride(0), qzeros.stride(0), y.stride(0), min(triton.next_power_of_2(M), 4096))
                        consts = dict(BITS=bits, ZERO_OFFSET=1, GROUP=group, HAS_GIDX=has_gidx, MMA=False,
                                      GEMV=schedule == "gemv", ATOMIC=atomic, UPCAST=False)
                        kind = ("_gidx" if has_gidx else "") + ("_det" if schedule != "large" and not atomic else "")
                        for cfg in kept:
                            bm, bn, bk, split, warps, stages = cfg
                            tag = (f"qmm_{schedule}_{bits}b{kind}"
                                   f"_{bm}x{bn}x{bk}_k{split}_w{warps}s{stages}_{shape}")
                            yield Variant(tag, _quant_matmul_kernel, args, dict(consts, **_cfg(*cfg).all_kwargs()),
                                          meta={"schedule": schedule, "M": M, "K": K, "N": N})
    yield from _aot_mma_variants(shapes)


def _aot_mma_variants(shapes: dict):
    """The same on the mma layout (``launch_mma_matmul``): int2/int3/int4 at group 128, int4 also at 32 (the
    per-element scale path)."""
    from ..._aot import AotTensor, Variant
    from .mma_layout import PAD_N, PREFETCH

    for schedule, configs in MMA_CONFIGS.items():
        M = {"gemv": 1, "small": 16, "large": 2048}[schedule]
        for atomic in ((True, False) if schedule != "large" else (False,)):
            for bits, group in ((2, 128), (3, 128), (4, 128), (4, 32)):
                kept = [c for c in configs if fits(c, group, False, atomic, interpreting=False, mma_bits=bits)]
                for shape, (K, N) in shapes.items():
                    n_pad = -(-N // PAD_N) * PAD_N
                    x = AotTensor(torch.float16, M, K)
                    words = AotTensor(torch.int32, n_pad * K * (2 if bits == 3 else bits) // 32 + PREFETCH * 128)
                    hwords = AotTensor(torch.int32, n_pad * K // 32 + PREFETCH * 64) if bits == 3 else words
                    scales = AotTensor(torch.float16, n_pad // 16, K // group, 16)
                    zeros = AotTensor(torch.uint8, n_pad // 16, K // group, 16)
                    y = AotTensor(torch.float32 if atomic else x.dtype, M, N)
                    args = (x, words, hwords, scales, zeros, words, y, M, N, K, x.stride(0), K, 16, 16,
                            y.stride(0), min(triton.next_power_of_2(M), 4096))
                    consts = dict(BITS=bits, ZERO_OFFSET=0, GROUP=group, HAS_GIDX=False, MMA=True,
                                  GEMV=schedule == "gemv", ATOMIC=atomic, UPCAST=False)
                    kind = "_det" if schedule != "large" and not atomic else ""
                    for cfg in kept:
                        bm, bn, bk, split, warps, stages = cfg
                        tag = (f"qmm_mma_{schedule}_{bits}b_g{group}{kind}"
                               f"_{bm}x{bn}x{bk}_k{split}_w{warps}s{stages}_{shape}")
                        yield Variant(tag, _quant_matmul_kernel, args, dict(consts, **_cfg(*cfg).all_kwargs()),
                                      meta={"schedule": schedule, "M": M, "K": K, "N": N, "layout": "mma"})
