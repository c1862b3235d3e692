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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton_utils import INTERPRETING


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
def _quant_matmul_kernel(
    x_ptr, qw_ptr, scales_ptr, qz_ptr, gidx_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_qw, stride_s, stride_qz, stride_ym,
    m_bucket,  # only an autotune key
    BITS: tl.constexpr,
    ZERO_OFFSET: tl.constexpr,  # 1 for the v1 "gptq" convention (stored zero − 1), 0 for v2
    GROUP: tl.constexpr,  # group size (K for a single group); tiles never straddle groups without g_idx
    HAS_GIDX: tl.constexpr,
    GEMV: tl.constexpr,
    ATOMIC: tl.constexpr,  # split-K partial sums into an fp32 buffer
    UPCAST: tl.constexpr,  # the interpreter multiplies raw bf16 bits in tl.dot: use fp32 there
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_span = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_begin = pid_k * k_span
    k_end = tl.minimum(K, k_begin + k_span)

    # zero-point fields of this tile's columns (packed along N like the weights along K)
    z_word = (offs_n // 32) * BITS + ((offs_n % 32) * BITS) // 32
    z_shift = (((offs_n % 32) * BITS) % 32).to(tl.uint32)

    if GEMV:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        codes = _unpack_tile(qw_ptr, k0, offs_n, mask_n, K, stride_qw, BITS, BLOCK_K)
        tile_mask = mask_k[:, None] & mask_n[None, :]
        if HAS_GIDX:
            g = tl.load(gidx_ptr + offs_k, mask=mask_k, other=0)
            scale = tl.load(scales_ptr + g[:, None].to(tl.int64) * stride_s + offs_n[None, :], mask=tile_mask,
                            other=0.0).to(tl.float32)
            z_ptrs = qz_ptr + g[:, None].to(tl.int64) * stride_qz + z_word[None, :]
            zlo = tl.load(z_ptrs, mask=tile_mask, other=0)
            zhi = zlo
            if BITS == 3:
                zhi = tl.load(z_ptrs + 1, mask=tile_mask & (z_shift > 29)[None, :], other=0)
            zero = _field(zlo, zhi, z_shift[None, :], BITS) + ZERO_OFFSET
            w = (codes - zero).to(tl.float32) * scale  # [BLOCK_K, BLOCK_N]
        else:
            g = k0 // GROUP
            scale = tl.load(scales_ptr + g * stride_s + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            z_ptrs = qz_ptr + g * stride_qz + z_word
            zlo = tl.load(z_ptrs, mask=mask_n, other=0)
            zhi = zlo
            if BITS == 3:
                zhi = tl.load(z_ptrs + 1, mask=mask_n & (z_shift > 29), other=0)
            zero = _field(zlo, zhi, z_shift, BITS) + ZERO_OFFSET
            w = (codes - zero[None, :])  # exact small integers; the scale is applied after the dot
        if GEMV:
            x = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            part = tl.sum(x[:, None] * w.to(tl.float32), axis=0)
            if HAS_GIDX:
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
            if HAS_GIDX:
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
# compile tier checks). The last tile of each list also serves the g_idx path, whose per-element
# scale/zero gathers need small tiles: only the tiles in GIDX_TILES are tuned there.
GEMV_CONFIGS = [(1, bn, bk, s, 4, 2) for bn, bk in ((128, 64), (256, 32), (64, 64), (128, 32)) for s in (1, 2, 4, 8)]
SMALL_M_CONFIGS = [(16, bn, bk, s, 4, 3) for bn, bk in ((128, 64), (64, 128), (128, 128), (64, 64), (128, 32))
                   for s in (1, 2, 4)]
LARGE_M_CONFIGS = [(64, 128, 32, 1, 4, 3), (64, 64, 32, 1, 4, 4), (128, 128, 32, 1, 8, 4)]
GIDX_TILES = {(1, 64, 64), (1, 128, 32), (16, 64, 64), (16, 128, 32), (64, 64, 32), (128, 128, 32)}
INTERPRETER_CONFIGS = {"gemv": (1, 32, 32, 2, 4, 1), "small": (16, 32, 32, 2, 4, 1), "large": (32, 32, 32, 1, 4, 1)}
SMALL_M_MAX = 64


def _prune(configs, named_args, **kwargs):
    """Without g_idx a K-tile must lie inside one group; with it, only the small tiles fit in registers."""
    group, gidx = kwargs["GROUP"], kwargs["HAS_GIDX"]
    kept = []
    for c in configs:
        tile = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"])
        if (tile in GIDX_TILES) if gidx else group % tile[2] == 0:
            kept.append(c)
    return kept or configs[-1:]


def _tuned(schedule: str, configs):
    cfgs = [_cfg(*INTERPRETER_CONFIGS[schedule])] if INTERPRETING else [_cfg(*c) for c in configs]
    atomic = schedule != "large"
    return triton.autotune(
        configs=cfgs,
        key=["m_bucket", "N", "K", "BITS", "GROUP", "HAS_GIDX"],
        prune_configs_by={"early_config_prune": _prune},
        restore_value=["y_ptr"] if atomic else None,  # tuning runs must not leave partial sums behind
    )(_quant_matmul_kernel)


_KERNELS = {
    "gemv": _tuned("gemv", GEMV_CONFIGS),
    "small": _tuned("small", SMALL_M_CONFIGS),
    "large": _tuned("large", LARGE_M_CONFIGS),
}


def schedule_for(M: int) -> str:
    return "gemv" if M == 1 else "small" if M <= SMALL_M_MAX else "large"


def launch_quant_matmul(x2, qweight, scales, qzeros, g_idx, bits: int, group_size: int, zero_offset: int):
    """``x2 [M, K] @ dequant(W)ᵀ`` → ``[M, N]`` in x2's dtype; inputs already validated."""
    M, K = x2.shape
    N = qweight.shape[1]
    schedule = schedule_for(M)
    group = K if group_size == -1 else group_size
    has_gidx = g_idx is not None
    if not has_gidx and (group % 16 or K % group):  # no tile shape divides the group: gather per element
        g_idx = (torch.arange(K, device=x2.device) // group).to(torch.int32)
        has_gidx = True
    atomic = schedule != "large"
    y = torch.zeros(M, N, dtype=torch.float32, device=x2.device) if atomic else torch.empty(
        M, N, dtype=x2.dtype, device=x2.device)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    _KERNELS[schedule][grid](
        x2, qweight, scales, qzeros, g_idx if has_gidx else qweight, y,
        M, N, K, x2.stride(0), qweight.stride(0), scales.stride(0), qzeros.stride(0), y.stride(0),
        min(triton.next_power_of_2(M), 4096),
        BITS=bits, ZERO_OFFSET=zero_offset, GROUP=group, HAS_GIDX=has_gidx, GEMV=schedule == "gemv",
        ATOMIC=atomic, UPCAST=INTERPRETING and x2.dtype == torch.bfloat16,
    )
    return y.to(x2.dtype) if atomic else y


def aot_variants():
    """For the compile tier: every tile shape of each schedule for int4 (SPLIT_K only changes a loop
    bound), and one representative tile for the other bit widths and the g_idx path."""
    sig = {"x_ptr": "*fp16", "qw_ptr": "*i32", "scales_ptr": "*fp16", "qz_ptr": "*i32", "gidx_ptr": "*i32",
           "y_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_qw": "i32",
           "stride_s": "i32", "stride_qz": "i32", "stride_ym": "i32", "m_bucket": "i32"}
    for schedule, configs in (("gemv", GEMV_CONFIGS), ("small", SMALL_M_CONFIGS), ("large", LARGE_M_CONFIGS)):
        tiles = list(dict.fromkeys((bm, bn, bk, w, st) for bm, bn, bk, _, w, st in configs))
        for bits in (2, 3, 4, 8):
            for has_gidx in (False, True):
                chosen = tiles if (bits, has_gidx) == (4, False) else tiles[-1:]
                for bm, bn, bk, warps, stages in chosen:
                    s = dict(sig, y_ptr="*fp32" if schedule != "large" else "*fp16")
                    const = dict(BITS=bits, ZERO_OFFSET=1, GROUP=128, HAS_GIDX=has_gidx, GEMV=schedule == "gemv",
                                 ATOMIC=schedule != "large", UPCAST=False, SPLIT_K=1, BLOCK_M=bm, BLOCK_N=bn,
                                 BLOCK_K=bk)
                    tag = f"qmm_{schedule}_{bits}b{'_gidx' if has_gidx else ''}_{bm}x{bn}x{bk}_w{warps}"
                    yield tag, _quant_matmul_kernel, s, const, dict(num_warps=warps, num_stages=stages)
