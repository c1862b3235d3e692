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
SMALL_M_MAX = 64


def configs_for(schedule: str) -> list[tuple]:
    if INTERPRETING:
        return INTERPRETER_CONFIGS[schedule]
    return QUICK_CONFIGS[schedule] if TUNE_QUICK else FULL_CONFIGS[schedule]


def fits(cfg: tuple, group: int, has_gidx: bool, atomic: bool, interpreting: bool = INTERPRETING) -> bool:
    """Without g_idx a K-tile must lie inside one group (one scale per tile); with it, only the small
    tiles fit in registers; without atomics there is no split-K."""
    bm, bn, bk, split = cfg[:4]
    if not atomic and split != 1:
        return False
    if has_gidx:
        return interpreting or (bm, bn, bk) in (GIDX_TILES if atomic else GIDX_TILES_NO_ATOMIC)
    return group % bk == 0


def _prune(configs, named_args, **kwargs):
    group, gidx, atomic = kwargs["GROUP"], kwargs["HAS_GIDX"], kwargs["ATOMIC"]
    kept = [c for c in configs if fits((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"],
                                        c.kwargs["SPLIT_K"]), group, gidx, atomic)]
    if not kept:  # the launcher only launches shapes that some config fits
        raise RuntimeError(f"quant_matmul: no tile config fits GROUP={group}, HAS_GIDX={gidx}, ATOMIC={atomic}")
    return kept


def _tuned(schedule: str):
    return triton.autotune(
        configs=[_cfg(*c) for c in configs_for(schedule)],
        key=["m_bucket", "N", "K", "BITS", "GROUP", "HAS_GIDX", "ATOMIC"],
        prune_configs_by={"early_config_prune": _prune},
        restore_value=["y_ptr"] if schedule != "large" else None,  # tuning must not leave partial sums behind
    )(_quant_matmul_kernel)


_KERNELS = {schedule: _tuned(schedule) for schedule in FULL_CONFIGS}
# Best config per launch key, filled by the first (tuned) launch outside a CUDA graph capture. Later
# launches use it directly, so a capture never runs the autotuner's benchmarks.
_BEST: dict[tuple, triton.Config] = {}


def schedule_for(M: int) -> str:
    return "gemv" if M == 1 else "small" if M <= SMALL_M_MAX else "large"


def _first_fit(schedule: str, group: int, has_gidx: bool, atomic: bool) -> triton.Config:
    return _cfg(*next(c for c in configs_for(schedule) if fits(c, group, has_gidx, atomic)))


def launch_quant_matmul(x2, qweight, scales, qzeros, g_idx, bits: int, group_size: int, zero_offset: int, *,
                        deterministic: bool = False):
    """``x2 [M, K] @ dequant(W)ᵀ`` → ``[M, N]`` in x2's dtype; inputs already validated."""
    M, K = x2.shape
    N = qweight.shape[1]
    if K > 1 and x2.stride(1) != 1:  # the kernel reads rows of x with unit stride
        x2 = x2.contiguous()
    schedule = schedule_for(M)
    atomic = schedule != "large" and not deterministic
    group = K if group_size == -1 else group_size
    has_gidx = g_idx is not None
    if not has_gidx and not any(fits(c, group, False, atomic) for c in configs_for(schedule)):
        # no K-tile divides the group (16, 48, 80, ...): gather the group per element instead
        g_idx = (torch.arange(K, device=x2.device) // group).to(torch.int32)
        has_gidx = True
    y = torch.zeros(M, N, dtype=torch.float32, device=x2.device) if atomic else torch.empty(
        M, N, dtype=x2.dtype, device=x2.device)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    m_bucket = min(triton.next_power_of_2(M), 4096)
    args = (x2, qweight, scales, qzeros, g_idx if has_gidx else qweight, y,
            M, N, K, x2.stride(0), qweight.stride(0), scales.stride(0), qzeros.stride(0), y.stride(0), m_bucket)
    consts = dict(BITS=bits, ZERO_OFFSET=zero_offset, GROUP=group, HAS_GIDX=has_gidx, GEMV=schedule == "gemv",
                  ATOMIC=atomic, UPCAST=INTERPRETING and x2.dtype == torch.bfloat16)
    key = (schedule, m_bucket, N, K, bits, group, has_gidx, atomic, x2.dtype, x2.device)
    cfg = _BEST.get(key)
    if cfg is None and (INTERPRETING or torch.cuda.is_current_stream_capturing()):
        cfg = _first_fit(schedule, group, has_gidx, atomic)  # untuned, and not remembered
    if cfg is None:
        kernel = _KERNELS[schedule]
        kernel[grid](*args, **consts)
        _BEST[key] = kernel.best_config
    else:
        _quant_matmul_kernel[grid](*args, **consts, **cfg.all_kwargs())
    return y.to(x2.dtype) if atomic else y


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
                        args = (x, qweight, scales, qzeros, g_idx, y, M, N, K, x.stride(0), qweight.stride(0),
                                scales.stride(0), qzeros.stride(0), y.stride(0), min(triton.next_power_of_2(M), 4096))
                        consts = dict(BITS=bits, ZERO_OFFSET=1, GROUP=group, HAS_GIDX=has_gidx,
                                      GEMV=schedule == "gemv", ATOMIC=atomic, UPCAST=False)
                        kind = ("_gidx" if has_gidx else "") + ("_det" if schedule != "large" and not atomic else "")
                        for cfg in kept:
                            bm, bn, bk, split, warps, stages = cfg
                            tag = (f"qmm_{schedule}_{bits}b{kind}"
                                   f"_{bm}x{bn}x{bk}_k{split}_w{warps}s{stages}_{shape}")
                            yield Variant(tag, _quant_matmul_kernel, args, dict(consts, **_cfg(*cfg).all_kwargs()),
                                          meta={"schedule": schedule, "M": M, "K": K, "N": N})
