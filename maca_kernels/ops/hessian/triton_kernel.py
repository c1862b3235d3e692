"""Triton kernel for the weighted Gram matrix ``out += Σ_t w(t) a_tᵀ b_t``.

One program owns a BLOCK_M × BLOCK_N tile of the output and streams the tokens through it in
chunks of BLOCK_T rows, reading ``x`` once in its own dtype: bf16/fp16 go straight to the tensor
cores with fp32 accumulation (the products are exact in fp32), fp32 uses IEEE fp32 (no silent tf32).

Accuracy: tensor cores add into their fp32 accumulator with truncation, so a long chain of MMAs drifts
toward zero on positive sums (the Hessian's diagonal). Every PROMOTE_EVERY chunks the MMA accumulator
is added into a second, round-to-nearest fp32 accumulator and restarted, which bounds the chain at
PROMOTE_EVERY · BLOCK_T tokens (the fp32 FMA path does not need it).

Weighting: ``Σ_t w(t) a_tᵀ b_t`` does not depend on the token order, so the chunk table lists chunks
sorted by weight (a MaCa length mix has 4 distinct weights). The accumulator holds the running sum in
units of the current weight; where the weight changes (the chunk's row count is stored negated) it is
rescaled once by ``w_old / w_new`` (a power of two for power-of-two lengths), and after the last chunk
multiplied by ``w``. The input is never rescaled and it costs a handful of roundings per tile.

Symmetric case (Hessian): only tiles touching the upper triangle run, into a scratch matrix; a small
second kernel adds its upper triangle and the mirror image to ``out``. (Mirroring inside the main kernel
doubled the epilogue's registers and made the wide tiles spill.) Tokens may be split over ``grid[1]``
programs (split-T) so the last wave of tiles is not mostly idle; results land with atomic adds.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..._triton_utils import INTERPRETING, TUNE_QUICK

# Token-chunk height per input kind; the chunk table is built for it, so it is not autotuned.
BLOCK_T_16BIT = 64
BLOCK_T_FP32 = 32
# Tensor-core chains are restarted every PROMOTE_EVERY_16BIT chunks (128 tokens, 8 MMA k-steps).
PROMOTE_EVERY_16BIT = 2

# (BLOCK_M, BLOCK_N, num_warps, num_stages). None spills registers on sm_90 (the compile tier checks).
# The chunk-table load takes one pipeline stage, so num_stages = buffers + 2.
CONFIGS_16BIT = [(128, 128, 8, 5), (128, 128, 8, 4), (64, 128, 4, 6), (128, 64, 4, 6), (64, 64, 4, 5)]
# fp32 (and the cross term of fp16 / fp32 inputs) run the dot on FMA units (one accumulator): wider tiles fit.
CONFIGS_FP32 = [(128, 256, 8, 4), (128, 128, 8, 4), (64, 128, 8, 4), (64, 64, 4, 4)]
# The bf16 cross term on tensor cores holds the fp32 difference and its three bf16 parts: the 16-bit tiles
# that do not spill on sm_90 (sm_8x: 64 x 64 only, the others spill there).
CONFIGS_CROSS = [(128, 128, 8, 4), (64, 128, 4, 5), (64, 64, 4, 5)]
CROSS_SM80 = (64, 64)
# Wide tiles spill on sm_8x (mma.sync accumulators are laid out differently): not tuned there.
SM80_MAX_TILE = 128 * 128


def _config(m, n, w, s):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)


def _configs():
    if INTERPRETING:  # the interpreter cannot autotune several configs; big tiles keep it fast
        return [_config(32, 32, 4, 1)]
    if TUNE_QUICK:  # a time-boxed GPU session: the two leading configs of each kind
        return [_config(*c) for c in dict.fromkeys(CONFIGS_16BIT[:2] + CONFIGS_FP32[:2] + CONFIGS_CROSS[-2:])]
    return [_config(*c) for c in dict.fromkeys(CONFIGS_16BIT + CONFIGS_FP32 + CONFIGS_CROSS)]


def _prune(configs, named_args, **kwargs):
    if INTERPRETING:
        return configs
    split3 = kwargs["SPLIT3"]
    wanted = CONFIGS_CROSS if split3 else CONFIGS_FP32 if kwargs["BLOCK_T"] == BLOCK_T_FP32 else CONFIGS_16BIT
    sm80 = torch.cuda.get_device_capability()[0] < 9
    kept = []
    for c in configs:
        m, n, w = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps
        too_big_for_sm80 = m * n > SM80_MAX_TILE or (w < 8 and m * n == SM80_MAX_TILE)
        if split3:
            too_big_for_sm80 = (m, n) != CROSS_SM80
        if (m, n, w, c.num_stages) in wanted and not (sm80 and too_big_for_sm80):
            kept.append(c)
    return kept or configs[-1:]


@triton.autotune(
    configs=_configs(),
    key=["d", "size_bucket", "WEIGHTED", "SYMMETRIC", "HAS_SUB", "SPLIT3", "BLOCK_T"],
    prune_configs_by={"early_config_prune": _prune},
    restore_value=["out_ptr"],  # tuning runs must not leave their sums in out
)
@triton.jit
def _weighted_gram_kernel(
    out_ptr,
    a_ptr,
    a_sub_ptr,
    b_ptr,
    chunk_start_ptr,  # int64 [n_chunks]: first row of the chunk
    chunk_rows_ptr,  # int32 [n_chunks]: rows in the chunk (≤ BLOCK_T), negated where the weight changes next
    chunk_weight_ptr,  # fp32 [n_chunks]: weight of the chunk's tokens
    chunk_rescale_ptr,  # fp32 [n_chunks]: w_c / w_(c+1) where the weight changes after chunk c
    n_chunks,
    d,
    stride_row,
    stride_out,
    size_bucket,  # log2 of the chunk count: only an autotune key
    WEIGHTED: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    HAS_SUB: tl.constexpr,
    SPLIT3: tl.constexpr,  # cross term of bf16 inputs on tensor cores: A = hi + mid + lo, three bf16 products
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    PROMOTE_EVERY: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    n_bn = tl.cdiv(d, BLOCK_N)
    bi = pid // n_bn
    bj = pid % n_bn
    # Tiles entirely below the diagonal are the mirror image of upper ones: nothing to do.
    if SYMMETRIC and bi * BLOCK_M >= (bj + 1) * BLOCK_N:
        return

    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    c_begin = (split * n_chunks) // n_split
    c_end = ((split + 1) * n_chunks) // n_split

    offs_t = tl.arange(0, BLOCK_T)
    offs_m = bi * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = bj * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < d
    mask_n = offs_n < d

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # round-to-nearest sum (stays 0 without promotion)
    part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # the dot's accumulator
    for c in range(c_begin, c_end):
        row0 = tl.load(chunk_start_ptr + c)
        rows_flag = tl.load(chunk_rows_ptr + c)
        n_rows = tl.abs(rows_flag)
        rows = (row0 + offs_t).to(tl.int64) * stride_row
        mask_t = offs_t < n_rows
        a_mask = mask_t[:, None] & mask_m[None, :]
        b_mask = mask_t[:, None] & mask_n[None, :]
        a = tl.load(a_ptr + rows[:, None] + offs_m[None, :], mask=a_mask, other=0.0)
        b = tl.load(b_ptr + rows[:, None] + offs_n[None, :], mask=b_mask, other=0.0)
        if HAS_SUB:  # GPTAQ cross term: A = x_fp − x, formed in fp32
            a_sub = tl.load(a_sub_ptr + rows[:, None] + offs_m[None, :], mask=a_mask, other=0.0)
            a = a.to(tl.float32) - a_sub.to(tl.float32)
            if not SPLIT3:
                b = b.to(tl.float32)
        if SPLIT3:
            # A = hi + mid + lo exactly up to 2⁻²⁴ of A (three bf16 roundings of what is left), each product
            # with the bf16 B exact in the fp32 accumulator: fp32-level sums at tensor-core speed.
            hi = a.to(tl.bfloat16)
            rest = a - hi.to(tl.float32)
            mid = rest.to(tl.bfloat16)
            lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
            if UPCAST:  # the interpreter multiplies raw bf16 bits in tl.dot
                b32 = b.to(tl.float32)
                part = tl.dot(tl.trans(lo.to(tl.float32)), b32, part, input_precision=INPUT_PRECISION)
                part = tl.dot(tl.trans(mid.to(tl.float32)), b32, part, input_precision=INPUT_PRECISION)
                part = tl.dot(tl.trans(hi.to(tl.float32)), b32, part, input_precision=INPUT_PRECISION)
            else:
                part = tl.dot(tl.trans(lo), b, part)
                part = tl.dot(tl.trans(mid), b, part)
                part = tl.dot(tl.trans(hi), b, part)
        else:
            if UPCAST:  # the interpreter multiplies raw bf16 bits in tl.dot
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            part = tl.dot(tl.trans(a), b, part, input_precision=INPUT_PRECISION)
        # The weight changes after this chunk (rare: chunks come sorted by weight). At the end of this
        # program's range the final multiply below applies the chunk's own weight instead.
        change = (rows_flag < 0) & (c + 1 < c_end)
        if PROMOTE_EVERY > 0:
            if ((c - c_begin) % PROMOTE_EVERY == PROMOTE_EVERY - 1) | change:
                acc += part
                part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if WEIGHTED:
            if change:
                rescale = tl.load(chunk_rescale_ptr + c)
                if PROMOTE_EVERY > 0:
                    acc = acc * rescale
                else:
                    part = part * rescale
    acc += part
    if WEIGHTED and c_end > c_begin:
        acc = acc * tl.load(chunk_weight_ptr + c_end - 1)

    # One writer per element unless tokens are split; the atomics make split-T and accumulation safe.
    out_tile = offs_m[:, None].to(tl.int64) * stride_out + offs_n[None, :]
    tl.atomic_add(out_ptr + out_tile, acc, mask=mask_m[:, None] & mask_n[None, :], sem="relaxed")


@triton.jit
def _symmetrize_add_kernel(out_ptr, upper_ptr, d, stride_out, stride_upper, BLOCK: tl.constexpr):
    """``out[i, j] += U[min(i, j), max(i, j)]`` from a scratch ``U`` of which only the upper triangle is
    valid, then zeroes what it read, so the scratch is ready for the next call without a memset. Program
    (bi, bj ≥ bi) reads upper tile (bi, bj) once and adds it to out's tile (bi, bj) and, transposed, to
    (bj, bi): every scratch element has exactly one reader."""
    bi = tl.program_id(0)
    bj = tl.program_id(1)
    if bi > bj:
        return
    offs_i = bi * BLOCK + tl.arange(0, BLOCK)
    offs_j = bj * BLOCK + tl.arange(0, BLOCK)
    in_bounds = (offs_i < d)[:, None] & (offs_j < d)[None, :]
    upper = offs_i[:, None] <= offs_j[None, :]
    u_ptrs = upper_ptr + offs_i[:, None].to(tl.int64) * stride_upper + offs_j[None, :]
    read = in_bounds & upper  # the scratch's lower triangle is never read, so it is never reset either
    u = tl.load(u_ptrs, mask=read, other=0.0)
    tl.store(u_ptrs, tl.where(read, 0.0, u), mask=read)  # derived from u: each element is read, then reset
    out_ij = out_ptr + offs_i[:, None].to(tl.int64) * stride_out + offs_j[None, :]
    if bi == bj:  # diagonal tile: both triangles from the upper one
        value = u + tl.trans(tl.where(offs_i[:, None] < offs_j[None, :], u, 0.0))
        tl.store(out_ij, tl.load(out_ij, mask=in_bounds) + value, mask=in_bounds)
    else:
        tl.store(out_ij, tl.load(out_ij, mask=in_bounds) + u, mask=in_bounds)
        out_ji = out_ptr + offs_j[:, None].to(tl.int64) * stride_out + offs_i[None, :]
        ji_bounds = tl.trans(in_bounds)
        tl.store(out_ji, tl.load(out_ji, mask=ji_bounds) + tl.trans(u), mask=ji_bounds)


def chunk_table(run_start: torch.Tensor, run_len: torch.Tensor, run_weight: torch.Tensor, block_t: int):
    """Cut runs into chunks of ≤ block_t rows, ordered by weight.

    Returns (start int64, rows int32 — negated on the last chunk before a weight change, weight fp32,
    rescale fp32 = w_c / w_(c+1) on those chunks, 0 elsewhere)."""
    order = torch.sort(run_weight, stable=True).indices
    run_start, run_len, run_weight = run_start[order], run_len[order], run_weight[order]
    per_run = (run_len + block_t - 1) // block_t
    n = int(per_run.sum())
    run_of_chunk = torch.repeat_interleave(torch.arange(run_len.numel()), per_run)
    first_chunk = torch.cumsum(per_run, 0) - per_run
    k = torch.arange(n) - first_chunk[run_of_chunk]
    start = run_start[run_of_chunk] + k * block_t
    rows = torch.minimum(run_len[run_of_chunk] - k * block_t, torch.tensor(block_t)).to(torch.int32)
    weight = run_weight[run_of_chunk]
    rescale = torch.zeros_like(weight)
    change = (weight[1:] != weight[:-1]).nonzero().flatten()
    rescale[change] = weight[change] / weight[change + 1]
    rows[change] = -rows[change]
    return start, rows, weight, rescale


def _upper_tiles(d: int, bm: int, bn: int) -> int:
    n_bm = triton.cdiv(d, bm)
    return sum(min(n_bm, triton.cdiv((j + 1) * bn, bm)) for j in range(triton.cdiv(d, bn)))


def choose_split(n_tiles: int, n_sms: int, n_chunks: int, max_split: int = 8) -> int:
    """Split the tokens over programs so that the last wave of tiles is not mostly idle."""
    best, best_cost = 1, float("inf")
    for s in range(1, max(1, min(max_split, n_chunks // 4)) + 1):
        cost = triton.cdiv(n_tiles * s, n_sms) / s  # waves, in units of one unsplit tile's work
        if cost < best_cost * 0.97:
            best, best_cost = s, cost
    return best


def table_offsets(n: int) -> tuple[int, ...]:
    """Byte offsets of the four chunk tables (int64 start, int32 rows, fp32 weight, fp32 rescale) in one
    buffer, each 16-byte aligned: the JIT specialises pointers on 16-byte alignment, so unaligned tables
    would compile a new variant whenever the chunk count's parity changes."""
    offsets, at = [0], 0
    for size in (8, 4, 4, 4):
        at += -(-size * n // 16) * 16
        offsets.append(at)
    return tuple(offsets)


def _device_tables(tables, device: torch.device):
    """The chunk tables on ``device`` with ONE host→device copy, from pinned memory without a host sync
    (the caching host allocator keeps the pinned block alive until the copy has run)."""
    offsets = table_offsets(tables[0].numel())
    on_gpu = device.type == "cuda"
    host = torch.empty(offsets[-1], dtype=torch.uint8, pin_memory=on_gpu)
    for t, lo in zip(tables, offsets, strict=False):
        host[lo : lo + t.numel() * t.element_size()].view(t.dtype).copy_(t)
    dev = host.to(device, non_blocking=True) if on_gpu else host
    return [dev[lo : lo + t.numel() * t.element_size()].view(t.dtype)
            for t, lo in zip(tables, offsets, strict=False)]


# Scratch for the symmetric case, one per (device, stream, d): the symmetrize pass resets what it reads,
# so a scratch is zeroed once when made, not on every call. A few d per model (hidden, intermediate).
_SCRATCH: dict[tuple, torch.Tensor] = {}
_SCRATCH_KEEP = 4


def _scratch(d: int, device: torch.device) -> torch.Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream, d)
    buf = _SCRATCH.pop(key, None)
    if buf is None:
        while len(_SCRATCH) >= _SCRATCH_KEEP:
            _SCRATCH.pop(next(iter(_SCRATCH)))
        buf = torch.zeros(d, d, dtype=torch.float32, device=device)
    _SCRATCH[key] = buf  # most recently used last
    return buf


def launch_weighted_gram(
    out: torch.Tensor,
    a: torch.Tensor,
    runs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    a_sub: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    weighted: bool = True,
    n_sms: int = 132,
    split: int | None = None,
    upper_only: bool = False,
) -> None:
    """``out += Σ_t w(t) A_tᵀ B_t`` with A = a (or a − a_sub), B = b (or A: symmetric, upper tiles only).

    Symmetric with ``upper_only``: the sums go straight into ``out``, of which only the upper triangle
    (i ≤ j) is then meaningful (``HessianAccumulator`` symmetrizes once, at the end). Otherwise they go
    through a cached scratch and a pass that adds them and their mirror image to ``out``. No host sync."""
    d = a.shape[1]
    symmetric = b is None
    cross = a_sub is not None
    split3 = cross and a.dtype == torch.bfloat16 and a_sub.dtype == torch.bfloat16 and (b is None or
                                                                                        b.dtype == torch.bfloat16)
    fp32_path = a.dtype == torch.float32 or (cross and not split3)
    block_t = BLOCK_T_FP32 if fp32_path else BLOCK_T_16BIT
    start, rows, weight, rescale = _device_tables(chunk_table(*runs, block_t), a.device)
    n_chunks = start.numel()
    via_scratch = symmetric and not upper_only
    target = _scratch(d, out.device) if via_scratch else out

    def grid(meta):
        bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
        n_tiles = _upper_tiles(d, bm, bn) if symmetric else triton.cdiv(d, bm) * triton.cdiv(d, bn)
        s = split if split is not None else choose_split(n_tiles, n_sms, n_chunks)
        return (triton.cdiv(d, bm) * triton.cdiv(d, bn), max(1, min(s, n_chunks)))

    _weighted_gram_kernel[grid](
        target,
        a,
        a_sub if cross else a,
        a if symmetric else b,
        start,
        rows,
        weight,
        rescale,
        n_chunks,
        d,
        a.stride(0),
        target.stride(0),
        int(math.log2(max(1, n_chunks))),
        WEIGHTED=weighted,
        SYMMETRIC=symmetric,
        HAS_SUB=cross,
        SPLIT3=split3,
        UPCAST=INTERPRETING and a.dtype == torch.bfloat16,
        INPUT_PRECISION="ieee",
        PROMOTE_EVERY=0 if fp32_path else PROMOTE_EVERY_16BIT,
        BLOCK_T=block_t,
    )
    if via_scratch:
        block = 32 if INTERPRETING else 64
        grid_sym = (triton.cdiv(d, block), triton.cdiv(d, block))
        _symmetrize_add_kernel[grid_sym](out, target, d, out.stride(0), target.stride(0), BLOCK=block)


def aot_variants():
    """For the compile tier: every autotune config of every input kind, launched the way
    ``launch_weighted_gram`` launches it on a real Hessian (d = 4096, 16k tokens). The tier derives
    signature and alignment from these values with the JIT's own rules. The chunk tables are views of
    one buffer at ``table_offsets`` (``_device_tables``): 256 chunks for one 16k-token run (unweighted),
    262 for a mix of sequence lengths (weighted)."""
    from ..._aot import AotTensor, Variant

    d, tokens = 4096, 16384
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    kinds = [  # (name, input dtype, symmetric, cross term)
        ("bf16", "bf16", True, False), ("fp16", "fp16", True, False), ("fp32", "fp32", True, False),
        ("cross_bf16", "bf16", False, True),
    ]
    for name, dt, symmetric, cross in kinds:
        split3 = cross and dt == "bf16"
        fp32_path = dt == "fp32" or (cross and not split3)
        block_t = BLOCK_T_FP32 if fp32_path else BLOCK_T_16BIT
        configs = CONFIGS_CROSS if split3 else CONFIGS_FP32 if fp32_path else CONFIGS_16BIT  # what _prune keeps
        target = AotTensor(torch.float32, d, d)
        a = AotTensor(dtypes[dt], tokens, d)
        for weighted in (True, False):
            n_chunks = tokens // block_t + (6 if weighted else 0)
            base = a.data_ptr() + (1 << 30)  # start | rows | weight | rescale, packed as in _device_tables
            index = [AotTensor(dtype, n_chunks, address=base + off)
                     for dtype, off in zip((torch.int64, torch.int32, torch.float32, torch.float32),
                                           table_offsets(n_chunks), strict=False)]
            args = (target, a, a, a, *index, n_chunks, d, a.stride(0), target.stride(0), int(math.log2(n_chunks)))
            consts = dict(WEIGHTED=weighted, SYMMETRIC=symmetric, HAS_SUB=cross, SPLIT3=split3, UPCAST=False,
                          INPUT_PRECISION="ieee", PROMOTE_EVERY=0 if fp32_path else PROMOTE_EVERY_16BIT,
                          BLOCK_T=block_t)
            for bm, bn, warps, stages in configs:
                too_big_for_sm80 = bm * bn > SM80_MAX_TILE or (warps < 8 and bm * bn == SM80_MAX_TILE)
                if split3:
                    too_big_for_sm80 = (bm, bn) != CROSS_SM80
                yield Variant(f"gram_{name}_{'seq' if weighted else 'tok'}_{bm}x{bn}_w{warps}s{stages}",
                              _weighted_gram_kernel, args,
                              dict(consts, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages),
                              archs=(90,) if too_big_for_sm80 else (90, 80))  # _prune drops it on sm_8x
    out = AotTensor(torch.float32, d, d)
    yield Variant("symmetrize_add", _symmetrize_add_kernel, (out, out, d, out.stride(0), out.stride(0)),
                  dict(BLOCK=64))  # the launcher's (default) launch options
