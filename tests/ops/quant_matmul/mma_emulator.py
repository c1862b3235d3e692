"""A CPU model of the CUDA GEMV (csrc/quant_matmul/gemv_mma.cu), lane by lane, for the tests.

Nothing CUDA runs on the CPU machines, so this replays what each lane of the kernel does to the stored
words: the same shifts, LOP3 masks and magic number, the same fp16 / bf16 arithmetic (one rounding per
HSUB2 / HFMA2, asserted to be exact), the per-group constants built from the zero points, then the A and B
fragments placed by the PTX mma.m16n8k16 fragment layout (a_r: row g + 8 (r % 2), column 2t + 8 (r // 2) + e;
b: row 2t + 8 j + e, column g) and multiplied in float64, with the group scales applied to each group's D.
``KERNEL_FIELDS`` lists the kernel's shifts, LOP3 masks and scales; a test checks them against the .cu file.
"""

from __future__ import annotations

import numpy as np

from maca_kernels.ops.quant_matmul.mma_layout import FEATURE, PAIR_COLUMNS, WORD_K, MmaWeight

MAGIC = {False: 0x64006400, True: 0x43004300}  # 1024 in fp16, 128 in bf16
# Per fragment register a0..a3, as in the .cu: (right shift of the word, low-bits mask, scale of the field)
KERNEL_FIELDS = {
    (4, False): [(0, 0x000F000F, 1.0), (0, 0x00F000F0, 1 / 16), (8, 0x000F000F, 1.0), (8, 0x00F000F0, 1 / 16)],
    (2, False): [(0, 0x00030003, 1.0), (0, 0x000C000C, 1 / 4), (0, 0x00300030, 1 / 16), (0, 0x00C000C0, 1 / 64)],
    (4, True): [(0, 0x000F000F, 1.0), (4, 0x000F000F, 1.0), (8, 0x000F000F, 1.0), (12, 0x000F000F, 1.0)],
    (2, True): [(0, 0x00030003, 1.0), (0, 0x000C000C, 1 / 4), (0, 0x00300030, 1 / 16), (2, 0x00300030, 1 / 16)],
}
# int3: (right shift of the high-bit source, mask) putting the high bit just above field r
HIGH_FIELDS = {False: [(0, 0x00040004), (0, 0x00100010), (0, 0x00400040), (0, 0x01000100)],
               True: [(0, 0x00040004), (0, 0x00100010), (0, 0x00400040), (2, 0x00400040)]}
M32 = 0xFFFFFFFF


def _halves(u: np.ndarray, bf16: bool) -> tuple[np.ndarray, np.ndarray]:
    """The two 16-bit halves of 32-bit words as float64 values of fp16 / bf16 bit patterns."""
    u = (u & M32).astype(np.uint32)
    lo, hi = u & 0xFFFF, u >> 16
    if bf16:
        as_f = lambda h: (h.astype(np.uint32) << 16).view(np.float32).astype(np.float64)  # noqa: E731
    else:
        as_f = lambda h: h.astype(np.uint16).view(np.float16).astype(np.float64)  # noqa: E731
    return as_f(lo), as_f(hi)


def _round(v: np.ndarray, bf16: bool) -> np.ndarray:
    """One rounding to the 16-bit type (the kernel's fma.rn / sub.rn); the decode must never round."""
    r = v.astype(np.float16).astype(np.float64) if not bf16 else _round_bf16(v)
    assert np.array_equal(r, v), "the decode rounded: the layout's fields do not fit the format"
    return r


def _round_bf16(v: np.ndarray) -> np.ndarray:
    b = v.astype(np.float32).view(np.uint32)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.view(np.float32).astype(np.float64)


def _pair(h: np.ndarray) -> np.ndarray:
    h = h & 0xFFFF
    return h | (h << 16)


def _zero_constants(bits: int, bf16: bool, zg: np.ndarray, zg8: np.ndarray) -> list[np.ndarray]:
    """The kernel's Zeros<BITS, BF16> (k0..k3), as 32-bit patterns."""
    if bf16:
        if bits == 4:
            return [_pair(0xC300 + zg), _pair(0xC300 + zg8)] * 2
        return [_pair(0xC300 + zg), _pair(0xC200 + 4 * zg8), _pair(0xC100 + 16 * zg), _pair(0xC100 + 16 * zg8)]
    if bits == 4:
        return [_pair(0x6400 + zg), _pair(0xD400 + 16 * zg8)] * 2
    return [_pair(0x6400 + zg), _pair(0xDC00 + 4 * zg8), _pair(0xD400 + 16 * zg), _pair(0xCC00 + 64 * zg8)]


def _decode(bits: int, bf16: bool, v: np.ndarray, c: np.ndarray | None, ks: list[np.ndarray]) -> list[tuple]:
    """Fragment registers a0..a3 of one k-tile: (low, high) values per register, each [..., 32 lanes]."""
    out = []
    fields = KERNEL_FIELDS[(4 if bits == 4 else 2, bf16)]
    for r, (shift, mask, scale) in enumerate(fields):
        t = ((v >> shift) & mask) | MAGIC[bf16]
        if bits == 3:
            hshift, hmask = HIGH_FIELDS[bf16][r]
            t = ((c >> hshift) & hmask) | t
        tl, th = _halves(t, bf16)
        kl, kh = _halves(ks[r], bf16)
        if not bf16 and r % 2 == 0 and scale == 1.0:  # sub.rn.f16x2 with +(1024 + z)
            lo, hi = _round(tl - kl, bf16), _round(th - kh, bf16)
        else:  # fma.rn with the scale and the negative constant: one rounding
            lo, hi = _round(tl * scale + kl, bf16), _round(th * scale + kh, bf16)
        out.append((lo, hi))
    return out


def _words(flat, n_tiles: int, count: int, per_load: int) -> np.ndarray:
    w = flat[: n_tiles * count * 32].cpu().numpy().astype(np.int64) & M32
    return w.reshape(n_tiles, count // per_load, 32, per_load).transpose(0, 1, 3, 2).reshape(n_tiles, count, 32)


def emulate(x: np.ndarray, w: MmaWeight, bf16: bool = False) -> np.ndarray:
    """y [M, N] (float64) that the kernel computes for x [M, K] (M ≤ 16: one mma per 8 rows of x on the same
    decoded fragment; fp16, or the float64 values of bf16 x with ``bf16``; in input order: gathered by
    ``w.perm`` as the kernel's staging does), exact products."""
    M, K = x.shape
    assert M <= 16 and K == w.K
    if w.perm is not None:
        x = x[:, w.perm.cpu().numpy()]
    b_cols = 8 * -(-M // 8)  # the B columns of the kernel's mma's (MT tiles of 8)
    n_pad = w.n_pad
    n_tiles = n_pad // 16
    bits = w.bits
    low = _words(w.words, n_tiles, K // WORD_K[bits], 4)
    high = _words(w.hwords, n_tiles, K // 64, 2) if bits == 3 else None
    # stored columns (g, g + 8) side by side per 16-column tile: back to column order
    pairs = (np.arange(n_pad) // 16 * 16 + PAIR_COLUMNS.numpy()[np.arange(n_pad) % 16])
    rows = w.scales.shape[1]  # G, per tile
    scales = np.empty((rows, n_pad))
    zeros = np.empty((rows, n_pad), dtype=np.int64)
    scales[:, pairs] = w.scales.float().cpu().numpy().transpose(1, 0, 2).reshape(rows, n_pad)
    zeros[:, pairs] = w.zeros.cpu().numpy().transpose(1, 0, 2).reshape(rows, n_pad)
    lane = np.arange(32)
    g, t = lane // 4, lane % 4
    n_of = np.arange(n_tiles)[:, None] * 16 + g[None, :]  # [tiles, lanes] column n = g of each lane
    xf = x.astype(np.float64)
    y = np.zeros((M, n_pad))
    d = np.zeros((n_tiles, 16, b_cols))
    for kt in range(K // 16):
        grp = kt * 16 // w.group_size
        ks = _zero_constants(bits, bf16, zeros[grp][n_of], zeros[grp][n_of + 8])
        if bits == 4:
            v, c = low[:, kt], None
        else:
            word = low[:, kt // 2]
            u = kt % 2
            v = word >> (8 * u)
            c = None
            if bits == 3:
                h = high[:, kt // 4]
                a = (kt // 2) % 2
                c = ((h << 1) if a else (h << 2)) & M32 if u == 0 else ((h >> 7) if a else (h >> 6))
        regs = _decode(bits, bf16, v, c, ks)
        A = np.zeros((n_tiles, 16, 16))
        for r, (lo, hi) in enumerate(regs):
            rows = g + 8 * (r % 2)
            cols = 2 * t + 8 * (r // 2)
            A[:, rows, cols] = lo
            A[:, rows, cols + 1] = hi
        B = np.zeros((16, b_cols))
        B[:, :M] = xf[:, kt // 2 * 32 + FEATURE.numpy()[kt % 2 * 16 + np.arange(16)]].T  # the slots' features
        d += A @ B
        if (kt + 1) * 16 % w.group_size == 0:  # group end: y += s * D
            s = scales[grp].reshape(n_tiles, 16)
            y += (d[:, :, :M] * s[:, :, None]).transpose(2, 0, 1).reshape(M, n_pad)
            d[:] = 0
    return y[:, : w.N]
