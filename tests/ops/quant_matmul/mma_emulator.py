"""A CPU model of the CUDA GEMV (csrc/quant_matmul/gemv_mma.cu), lane by lane, for the tests.

Nothing CUDA runs on the CPU machines, so this replays what each lane of the kernel does to the stored
words: the same shifts, LOP3 masks and magic number, the same fp16 arithmetic (numpy float16, one rounding
per HSUB2 / HFMA2 like the hardware), the per-group constants built from the zero points, then the A and B
fragments placed by the PTX mma.m16n8k16 fragment layout (a_r: row g + 8 (r % 2), column 2t + 8 (r // 2) + e;
b: row 2t + 8 j + e, column g) and multiplied in float64, with the group scales applied to each group's D.
``KERNEL_MASKS`` lists the kernel's LOP3 masks in source order; a test checks them against the .cu file.
"""

from __future__ import annotations

import numpy as np

from maca_kernels.ops.quant_matmul.mma_layout import WORD_K, MmaWeight

MAGIC = 0x64006400
KERNEL_MASKS = {  # (low-bits mask, scale of the field) per fragment register a0..a3, as in the .cu
    4: [(0x000F000F, 1.0), (0x00F000F0, 1 / 16), (0x000F000F, 1.0), (0x00F000F0, 1 / 16)],
    2: [(0x00030003, 1.0), (0x000C000C, 1 / 4), (0x00300030, 1 / 16), (0x00C000C0, 1 / 64)],
}
HIGH_MASKS = [0x00040004, 0x00100010, 0x00400040, 0x01000100]  # int3: the high bit just above field r
M32 = 0xFFFFFFFF


def _halves(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u = (u & M32).astype(np.uint32)
    return (u & 0xFFFF).astype(np.uint16).view(np.float16), (u >> 16).astype(np.uint16).view(np.float16)


def _pair(h: np.ndarray) -> np.ndarray:
    h = h & 0xFFFF
    return h | (h << 16)


def _zero_constants(bits: int, zg: np.ndarray, zg8: np.ndarray) -> list[np.ndarray]:
    """The kernel's Zeros<BITS> (k0..k3), as 32-bit patterns."""
    if bits == 4:
        return [_pair(0x6400 + zg), _pair(0xD400 + 16 * zg8)]
    return [_pair(0x6400 + zg), _pair(0xDC00 + 4 * zg8), _pair(0xD400 + 16 * zg), _pair(0xCC00 + 64 * zg8)]


def _decode(bits: int, v: np.ndarray, c: np.ndarray | None, ks: list[np.ndarray]) -> list[tuple]:
    """Fragment registers a0..a3 of one k-tile: (low fp16, high fp16) per register, each [..., 32 lanes]."""
    out = []
    for r in range(4):
        if bits == 4:
            src = v if r < 2 else v >> 8
            mask, scale = KERNEL_MASKS[4][r]
            const = ks[r % 2]
            hsub = r % 2 == 0
        else:
            src = v
            mask, scale = KERNEL_MASKS[2][r]
            const = ks[r]
            hsub = r == 0
        t = (src & mask) | MAGIC
        if bits == 3:
            t = (c & HIGH_MASKS[r]) | t
        tl, th = _halves(t)
        kl, kh = _halves(const)
        if hsub:  # sub.rn.f16x2
            lo = (tl.astype(np.float64) - kl.astype(np.float64)).astype(np.float16)
            hi = (th.astype(np.float64) - kh.astype(np.float64)).astype(np.float16)
        else:  # fma.rn.f16x2 with the scale: one rounding
            lo = (tl.astype(np.float64) * scale + kl.astype(np.float64)).astype(np.float16)
            hi = (th.astype(np.float64) * scale + kh.astype(np.float64)).astype(np.float16)
        out.append((lo, hi))
    return out


def _words(flat, n_tiles: int, count: int, per_load: int) -> np.ndarray:
    w = flat[: n_tiles * count * 32].cpu().numpy().astype(np.int64) & M32
    return w.reshape(n_tiles, count // per_load, 32, per_load).transpose(0, 1, 3, 2).reshape(n_tiles, count, 32)


def emulate(x: np.ndarray, w: MmaWeight) -> np.ndarray:
    """y [M, N] (float64) that the kernel computes for x fp16 [M, K] (M ≤ 8), exact products."""
    M, K = x.shape
    assert M <= 8 and K == w.K
    n_pad = w.scales.shape[1]
    n_tiles = n_pad // 16
    bits = w.bits
    low = _words(w.words, n_tiles, K // WORD_K[bits], 4)
    high = _words(w.hwords, n_tiles, K // 64, 2) if bits == 3 else None
    scales = w.scales.float().cpu().numpy().astype(np.float64)
    zeros = w.zeros.cpu().numpy().astype(np.int64)
    lane = np.arange(32)
    g, t = lane // 4, lane % 4
    n_of = np.arange(n_tiles)[:, None] * 16 + g[None, :]  # [tiles, lanes] column n = g of each lane
    xf = x.astype(np.float64)
    y = np.zeros((M, n_pad))
    d = np.zeros((n_tiles, 16, 8))
    for kt in range(K // 16):
        grp = kt * 16 // w.group_size
        ks = _zero_constants(bits, zeros[grp][n_of], zeros[grp][n_of + 8])
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
        regs = _decode(bits, v, c, ks)
        A = np.zeros((n_tiles, 16, 16))
        for r, (lo, hi) in enumerate(regs):
            rows = g + 8 * (r % 2)
            cols = 2 * t + 8 * (r // 2)
            A[:, rows, cols] = lo.astype(np.float64)
            A[:, rows, cols + 1] = hi.astype(np.float64)
        B = np.zeros((16, 8))
        B[:, :M] = xf[:, kt * 16 : kt * 16 + 16].T
        d += A @ B
        if (kt + 1) * 16 % w.group_size == 0:  # group end: y += s * D
            s = scales[grp].reshape(n_tiles, 16)
            y += (d[:, :, :M] * s[:, :, None]).transpose(2, 0, 1).reshape(M, n_pad)
            d[:] = 0
    return y[:, : w.N]
