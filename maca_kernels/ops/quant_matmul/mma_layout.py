"""The "mma" decode layout read by the CUDA GEMV (``csrc/quant_matmul/gemv_mma.cu``; the comment at its top
explains the encoding), converted once from codes, zeros and scales, and back, losslessly.

Each lane of a warp owns one 32-bit word per tensor-core A fragment, holding exactly the values it feeds to
``mma.m16n8k16`` for its two output columns ``g`` and ``g + 8`` (``g = lane // 4``) at the fragment's k slots
``2t, 2t+1, 2t+8, 2t+9`` (``t = lane % 4``). A pair (k, k + 1) sits at the same field of the word's low and
high 16-bit halves, so one LOP3 decodes both. The tables below list, for each value of a word, its bit
offset and its offsets in n and slot from the lane's base; the kernel's masks and shifts are these tables.
Slots are not features: in each 32 values of k (two k-tiles), slot ``2t + 8h + e`` of tile ``u`` holds
feature ``8t + 4u + 2h + e`` (``FEATURE``), so lane t's B fragments of both tiles are x's 8 contiguous values
``8t .. 8t + 7``: one 128-bit load.

Storage: ``words`` int32, per 16-column tile ``[K / VEC_K][lane][4]`` (one 128-bit load per lane per four
words), then PREFETCH spare warp loads (the kernel's loads run that far ahead); int3 adds ``hwords`` (the high
bits, ``[K / VEC_K][lane][2]`` per tile plus the spares); ``scales`` fp16 and ``zeros`` uint8
``[N_pad / 16, G, 16]``: per 16-column tile its groups one after another, each
group's columns in the order ``g, g + 8`` for g = 0..7 (``PAIR_COLUMNS``: a lane's two columns side by side, so
one load fetches both; consecutive groups 32 / 16 bytes apart, so a trip's groups are immediate offsets from
one address). Columns are padded to a multiple of PAD_N with zero codes.
Zero points are stored as numbers (not the "gptq" v1 ``zero − 1``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD_N = 64  # columns are padded to a multiple of this
WORD_K = {4: 16, 3: 32, 2: 32}  # k values per low-bits word
VEC_K = {b: 4 * w for b, w in WORD_K.items()}  # k values per 128-bit load
KERNEL_GROUPS = {4: (32, 64, 128), 3: (128,), 2: (128,)}  # group sizes compiled besides one group over K
PREFETCH = 8  # 128-bit loads in flight per lane at most (Prefetch<MT> in the .cu): the spare loads
HIGH_BASE = (0, 8, 1, 9)  # int3: bit of field 0 (low half) for (low word a, tile u) at index 2a + u
_r = torch.arange(32)  # slot 2t + 8h + e of tile u, as r = 16u + 8h + 2t + e within 32 values of k
FEATURE = 8 * ((_r % 8) // 2) + 4 * (_r // 16) + 2 * ((_r % 16) // 8) + _r % 2  # feature of slot r
_c = torch.arange(16)
PAIR_COLUMNS = 8 * (_c % 2) + _c // 2  # stored column c of a 16-column tile holds column PAIR_COLUMNS[c]


def _low_fields(bits: int) -> list[tuple[int, int, int]]:
    """(bit offset, n offset, k offset) of every value of a low-bits word, relative to the lane's base
    (n = g, k = 2t of the word's first k-tile). Field r of a tile is fragment register a_r: n + 8 (r % 2),
    k + 8 (r // 2); the low half holds k, the high half k + 1."""
    fields = []
    tiles, width = (1, 4) if bits == 4 else (2, 2)
    for u in range(tiles):
        for r in range(4):
            for e in range(2):
                fields.append((8 * u + width * r + 16 * e, 8 * (r % 2), 16 * u + 8 * (r // 2) + e))
    return fields


def _high_fields() -> list[tuple[int, int, int]]:
    """int3: (bit, n offset, k offset) of the high bits of four k-tiles (two low words) in one word."""
    fields = []
    for a in range(2):
        for u in range(2):
            for r in range(4):
                for e in range(2):
                    bit = HIGH_BASE[2 * a + u] + 2 * r + 16 * e
                    fields.append((bit, 8 * (r % 2), 32 * a + 16 * u + 8 * (r // 2) + e))
    return fields


@dataclass(frozen=True)
class MmaWeight:
    words: torch.Tensor  # int32, flat
    hwords: torch.Tensor  # int32, flat (empty unless bits == 3)
    scales: torch.Tensor  # fp16 [N_pad / 16, G, 16]
    zeros: torch.Tensor  # uint8 [N_pad / 16, G, 16]
    bits: int
    group_size: int  # k values per group (K for one group)
    K: int
    N: int
    perm: torch.Tensor | None = None  # int32 [K]: the input feature of each row (act-order), gathered in-kernel

    @property
    def n_pad(self) -> int:
        """Columns of the layout (N padded to a multiple of PAD_N)."""
        return self.scales.shape[0] * 16

    @property
    def kernel_group(self) -> int:
        """The kernel's GROUP template argument: 0 for one group over all of K."""
        return 0 if self.group_size == self.K else self.group_size


def supports(bits: int, group_size: int, K: int, N: int) -> bool:
    """Whether the CUDA GEMV has a kernel for this layer (others take the Triton kernels)."""
    if bits not in WORD_K or K <= 0 or N <= 0 or K % VEC_K[bits]:
        return False
    group = K if group_size in (-1, K) else group_size
    return group == K or (group in KERNEL_GROUPS[bits] and K % group == 0)


def _lane_index(device) -> tuple[torch.Tensor, torch.Tensor]:
    lane = torch.arange(32, device=device)
    return lane // 4, lane % 4


def _pack_words(codes: torch.Tensor, fields, word_k: int, bits_mask: int, shift: int) -> torch.Tensor:
    """int64 words [n_tiles, K / word_k, 32] of ((codes >> shift) & bits_mask) placed per ``fields``."""
    n_pad, K = codes.shape
    g, t = _lane_index(codes.device)
    c = codes.reshape(n_pad // 16, 16, K // word_k, word_k).permute(0, 2, 1, 3)  # [tile, word, n, k]
    words = torch.zeros(n_pad // 16, K // word_k, 32, dtype=torch.int64, device=codes.device)
    for bit, dn, dk in fields:
        words |= ((c[:, :, g + dn, 2 * t + dk] >> shift) & bits_mask) << bit  # [tile, word, lane]
    return words


def _unpack_words(words: torch.Tensor, fields, word_k: int, bits_mask: int, shift: int, out: torch.Tensor) -> None:
    """Adds the fields of ``words`` [n_tiles, K / word_k, 32] into ``out`` [N_pad, K] (codes), at << shift."""
    n_pad, K = out.shape
    g, t = _lane_index(words.device)
    o = out.view(n_pad // 16, 16, K // word_k, word_k).permute(0, 2, 1, 3)  # [tile, word, n, k]
    for bit, dn, dk in fields:
        o[:, :, g + dn, 2 * t + dk] += ((words >> bit) & bits_mask) << shift


def _store(words: torch.Tensor, per_load: int) -> torch.Tensor:
    """[n_tiles, words, 32] → flat int32 in load order [n_tiles][words / per_load][lane][per_load] + spares."""
    n_tiles, count, _ = words.shape
    w = words.reshape(n_tiles, count // per_load, per_load, 32).permute(0, 1, 3, 2).reshape(-1)
    w = torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)
    return torch.cat([w, torch.zeros(PREFETCH * 32 * per_load, dtype=torch.int32, device=w.device)])


def _load(flat: torch.Tensor, n_tiles: int, count: int, per_load: int) -> torch.Tensor:
    w = flat[: n_tiles * count * 32].to(torch.int64) & 0xFFFFFFFF
    return w.reshape(n_tiles, count // per_load, 32, per_load).permute(0, 1, 3, 2).reshape(n_tiles, count, 32)


def pack_mma(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> MmaWeight:
    """``codes`` int [N, K] in [0, 2^bits), ``zeros`` int [N, G], ``scales`` fp16 [N, G] (G = K / group_size,
    or 1 with ``group_size`` −1) → :class:`MmaWeight`. Only shapes that :func:`supports` accepts."""
    N, K = codes.shape
    if not supports(bits, group_size, K, N):
        raise ValueError(f"the mma layout has no kernel for bits={bits}, group_size={group_size}, K={K}, N={N}")
    group = K if group_size in (-1, K) else group_size
    G = K // group
    if scales.dtype != torch.float16:
        raise ValueError(f"scales must be float16 (the checkpoint's dtype), got {scales.dtype}")
    if tuple(zeros.shape) != (N, G) or tuple(scales.shape) != (N, G):
        raise ValueError(f"zeros and scales must be [N, G] = [{N}, {G}], got {tuple(zeros.shape)} and "
                         f"{tuple(scales.shape)}")
    n_pad = -(-N // PAD_N) * PAD_N
    dev = codes.device
    c = torch.zeros(n_pad, K, dtype=torch.int64, device=dev)
    c[:N] = codes.to(torch.int64)[:, _slot_features(K, dev)]  # in slot order
    mask = 15 if bits == 4 else 3  # int3 stores its low two bits here, the high bit in hwords
    words = _pack_words(c, _low_fields(bits), WORD_K[bits], mask, 0)
    hwords = torch.zeros(0, dtype=torch.int32, device=dev)
    if bits == 3:
        hwords = _store(_pack_words(c, _high_fields(), 64, 1, 2), 2)
    s = torch.zeros(G, n_pad, dtype=torch.float16, device=dev)
    z = torch.zeros(G, n_pad, dtype=torch.uint8, device=dev)
    s[:, :N] = scales.T.to(torch.float16)
    z[:, :N] = zeros.T.to(torch.uint8)
    pairs = _pair_columns(n_pad, dev)
    return MmaWeight(_store(words, 4), hwords, _by_tile(s[:, pairs]), _by_tile(z[:, pairs]), bits, group, K, N)


def _by_tile(t: torch.Tensor) -> torch.Tensor:
    """[G, N_pad] → [N_pad / 16, G, 16], contiguous."""
    return t.reshape(t.shape[0], -1, 16).transpose(0, 1).contiguous()


def _slot_features(K: int, device) -> torch.Tensor:
    """The feature held by each slot position 0..K-1 (FEATURE within every 32 values of k)."""
    k = torch.arange(K, device=device)
    return k - k % 32 + FEATURE.to(device)[k % 32]


def _pair_columns(n_pad: int, device) -> torch.Tensor:
    """The column held by each stored column 0..n_pad-1 (PAIR_COLUMNS within every 16-column tile)."""
    n = torch.arange(n_pad, device=device)
    return n - n % 16 + PAIR_COLUMNS.to(device)[n % 16]


def column_block(w: MmaWeight, n0: int, n1: int) -> MmaWeight:
    """Columns ``n0 … n1`` of ``w`` (multiples of 16, ``n1`` at most the padded width) as views: a layout of
    its own without spare loads or act-order ``perm`` (for :func:`unpack_mma` a block at a time)."""
    n_pad = w.n_pad
    if n0 % 16 or n1 % 16 or not 0 <= n0 < n1 <= n_pad:
        raise ValueError(f"column block [{n0}, {n1}) must be whole 16-column tiles within [0, {n_pad})")
    per_tile = w.K // WORD_K[w.bits] * 32  # words of one 16-column tile
    words = w.words[n0 // 16 * per_tile: n1 // 16 * per_tile]
    hwords = w.hwords[n0 // 16 * (w.K // 2): n1 // 16 * (w.K // 2)] if w.bits == 3 else w.hwords
    tiles = slice(n0 // 16, n1 // 16)
    return MmaWeight(words, hwords, w.scales[tiles], w.zeros[tiles], w.bits, w.group_size, w.K,
                     max(0, min(w.N, n1) - n0))


def unpack_mma(w: MmaWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_mma`: (codes int32 [N, K], zeros int32 [N, G], scales fp16 [N, G])."""
    n_pad = w.n_pad
    n_tiles, G = n_pad // 16, w.K // w.group_size
    codes = torch.zeros(n_pad, w.K, dtype=torch.int64, device=w.words.device)
    mask = 15 if w.bits == 4 else 3
    count = w.K // WORD_K[w.bits]
    _unpack_words(_load(w.words, n_tiles, count, 4), _low_fields(w.bits), WORD_K[w.bits], mask, 0, codes)
    if w.bits == 3:
        _unpack_words(_load(w.hwords, n_tiles, w.K // 64, 2), _high_fields(), 64, 1, 2, codes)
    features = torch.empty_like(codes)
    features[:, _slot_features(w.K, codes.device)] = codes
    pairs = _pair_columns(n_pad, codes.device)
    z = torch.empty(G, n_pad, dtype=w.zeros.dtype, device=w.zeros.device)
    s = torch.empty(G, n_pad, dtype=w.scales.dtype, device=w.scales.device)
    z[:, pairs] = w.zeros.transpose(0, 1).reshape(G, n_pad)
    s[:, pairs] = w.scales.transpose(0, 1).reshape(G, n_pad)
    return (features[: w.N].to(torch.int32), z[:, : w.N].T.to(torch.int32).contiguous(),
            s[:, : w.N].T.contiguous())
