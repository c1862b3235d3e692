// Packed int4 / int3 / int2 GEMV (M <= 16 rows of fp16 or bf16 x) on tensor cores, on the "mma" layout.
//
// Self-contained (no headers): compiled at run time by NVRTC (maca_kernels/ops/quant_matmul/cuda_kernel.py)
// and by nvcc for the compile tier (tests/test_cuda_compile_tier.py), which counts the main loop's SASS.
//
// Why tensor cores for M = 1: an fp32 FMA per weight alone costs 1 thread-instruction per weight, and the
// budget that bandwidth allows is 1.8 (int2) to 3.0 (int4) including decoding. mma.m16n8k16 takes 256
// weights per warp instruction. The weights are operand A (16 output columns x 16 k), x is operand B (its
// 8 columns are 8 rows of x), so every lane's D registers hold finished dot products. 9..16 rows: each decoded
// fragment feeds a second mma (MT = 2 tiles of 8 rows), so decoding is paid once for both.
//
// Layout (maca_kernels/ops/quant_matmul/mma_layout.py): one 32-bit word per lane per A fragment, so a lane
// decodes only the values it feeds to the mma. With g = lane / 4, t = lane % 4, the fragment of a 16 x 16
// tile is a0 = (n = g, k = 2t, 2t+1), a1 = (g + 8, 2t..), a2 = (g, 2t + 8..), a3 = (g + 8, 2t + 8..), each
// an f16x2 pair. A pair sits at the same field of the word's low and high 16-bit halves, so one LOP3 with
// the exponent of 1024 ORed in makes both halves 1024 + 2^s q in fp16 at once, and one HSUB2 / HFMA2 with
// a per-lane constant gives the exact integer q - z (zero point included, so products are exact in fp32).
//   int4: word = one tile. Nibbles (0,4) a0, (1,5) a1 (x16), then w >> 8: (0,4) a2, (1,5) a3 (x16).
//   int2: word = two k-tiles; fields (0..3) of w are tile 0's a0..a3 (x 1, 4, 16, 64), of w >> 8 tile 1's.
//   int3: the low two bits as int2, plus one high-bit word per two low words (four k-tiles), its bit for
//         field r of (low word a, tile u) at 2r + {0, 8, 1, 9}[2a + u] (+16 for the high half); a second
//         LOP3 ORs it in just above the field, so 1024 + 4^r q comes out of two LOP3s.
//   bf16 x (mma with bf16 operands) reads the same words with 128 as the magic number: its 7-bit mantissa
//   has no room above bit 6, so fields that would land there are shifted down first (see Zeros).
// Words are stored [n tile][k word / 4][lane][4]: one 128-bit load per lane covers four words, and a warp's
// load is 512 contiguous bytes. kPrefetch spare warp loads follow the last n tile, and the scales and zeros
// one spare row, so the loads that run ahead never need a bounds check.
//
// Work split: a CTA is 4 warps, one 16-column tile each (64 columns), over one range of K (blockIdx.y); the
// last CTA of a column block to finish adds the ranges' partial sums (see gemv_mma). x is staged in shared memory in fragment
// order (b0 = x[m][2t, 2t+1], b1 = x[m][2t + 8, 2t + 9] for m = 8 mt + g), kChunk values of k at a time. B columns
// m >= M hold whatever is in shared memory: their D columns are never stored.
//
// Groups: GROUP values of k (whole words) share a scale and zero point; D restarts per group and y += s * D
// at its end, between 128-bit loads or, for groups shorter than one, between its words. GROUP = 0: one group
// over the whole K.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

// The inline-PTX helpers. MACA_HOST_EMULATION (tests/ops/quant_matmul/cuda_host.h) replaces them, and the CUDA
// built-ins, with C++ that runs every lane of a CTA as a host thread: the kernel's own code, checked on the CPU.
#ifndef MACA_HOST_EMULATION
#define MACA_DEVICE __device__ __forceinline__

MACA_DEVICE u32 lop_or(u32 w, u32 mask, u32 magic) {  // (w & mask) | magic in one LOP3
  u32 d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(w), "r"(mask), "r"(magic));
  return d;
}

MACA_DEVICE u32 hsub2(u32 a, u32 b) {
  u32 d;
  asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

MACA_DEVICE u32 hfma2(u32 a, u32 b, u32 c) {
  u32 d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

MACA_DEVICE u32 bfma2(u32 a, u32 b, u32 c) {
  u32 d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

template <bool BF16>
MACA_DEVICE void mma16816(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  if constexpr (BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

MACA_DEVICE float half_to_float(u16 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

template <bool BF16>
MACA_DEVICE u16 to_x(float f) {  // fp32 -> x's type, round to nearest even
  u16 h;
  if constexpr (BF16) {
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  } else {
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  }
  return h;
}

MACA_DEVICE float load_l2(const float* p) {  // another SM's store: read at L2, never from this SM's L1
  float f;
  asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(f) : "l"(p));
  return f;
}

MACA_DEVICE u32 pair(u32 h) {  // the low 16 bits in both halves: one PRMT
  u32 d;
  asm("prmt.b32 %0, %1, 0, 0x1010;" : "=r"(d) : "r"(h));
  return d;
}
#endif  // MACA_HOST_EMULATION

constexpr u32 kMagic = 0x64006400u;      // 1024.0 in both fp16 halves
constexpr u32 kMagicBf16 = 0x43004300u;  // 128.0 in both bf16 halves (7-bit mantissa: fields stay below bit 7)
constexpr int kWarps = 4;
constexpr int kChunk = 512;  // k values of x staged at a time (8 KB of fragments per 8-row tile)
constexpr int kPrefetch = 4;  // 128-bit loads in flight per lane (mma_layout.PREFETCH)
constexpr int kMinCtas = 4;   // CTAs per SM the registers must allow (cuda_kernel.py asks the driver for the count)

// Per-lane constants of one group: the negated offset (2^-s * magic + z) of every scale variant s, each
// pair(A + z B): LEA + PRMT. fp16: scales 1, 1/16 (int4) and 1, 1/4, 1/16, 1/64 (int2/int3). bf16 has
// no room for the x16 fields (its mantissa has 7 bits), so int4 shifts every field to bit 0 (scale 1) and
// int2/int3 read field 3 two bits lower (scale 1/16 like field 2).
template <int BITS, bool BF16>
struct Zeros {
  u32 k0, k1, k2, k3;  // fragment registers a0..a3 (n = g, g + 8, g, g + 8)
  MACA_DEVICE Zeros(u32 zg, u32 zg8) {
    if constexpr (BF16) {
      k0 = pair(0xC300u + zg);                                  // -(128 + z) (ulp 1)
      k1 = pair(BITS == 4 ? 0xC300u + zg8 : 0xC200u + zg8 * 4u);  // int2/3: -(32 + z) (ulp 1/4)
      k2 = BITS == 4 ? k0 : pair(0xC100u + zg * 16u);            // int2/3: -(8 + z) (ulp 1/16; z = 8: -16)
      k3 = BITS == 4 ? k1 : pair(0xC100u + zg8 * 16u);
    } else {
      k0 = pair(0x6400u + zg);                                  // 1024 + z (ulp 1), subtracted
      k1 = pair(BITS == 4 ? 0xD400u + zg8 * 16u : 0xDC00u + zg8 * 4u);  // -(64 + z) / -(256 + z)
      k2 = BITS == 4 ? k0 : pair(0xD400u + zg * 16u);            // -(64 + z)
      k3 = BITS == 4 ? k1 : pair(0xCC00u + zg8 * 64u);           // -(16 + z) (ulp 1/64)
    }
  }
};

// One k-tile of one word: decode the lane's A fragment and multiply it by the B fragments of the MT 8-row
// tiles of x (b[mt]: two k-tiles' (b0, b1), the lower or the upper pair). int3 also takes c, the high-bit
// plane word shifted so that field r's bit sits at 2r + 2 of both halves.
template <int BITS, bool BF16, int MT>
MACA_DEVICE void tile_mma(float (&d)[MT][4], u32 v, u32 c, const Zeros<BITS, BF16>& z, const uint4 (&b)[MT],
                          bool upper) {
  u32 a0, a1, a2, a3;
  if constexpr (!BF16 && BITS == 4) {
    const u32 s16 = 0x2C002C00u;  // 1/16
    const u32 hi = v >> 8;
    a0 = hsub2(lop_or(v, 0x000F000Fu, kMagic), z.k0);
    a1 = hfma2(lop_or(v, 0x00F000F0u, kMagic), s16, z.k1);
    a2 = hsub2(lop_or(hi, 0x000F000Fu, kMagic), z.k0);
    a3 = hfma2(lop_or(hi, 0x00F000F0u, kMagic), s16, z.k1);
  } else if constexpr (!BF16) {  // int2, int3 (c: high bits ORed in above each field)
    const u32 s4 = 0x34003400u, s16 = 0x2C002C00u, s64 = 0x24002400u;  // 1/4, 1/16, 1/64
    u32 t0 = lop_or(v, 0x00030003u, kMagic), t1 = lop_or(v, 0x000C000Cu, kMagic);
    u32 t2 = lop_or(v, 0x00300030u, kMagic), t3 = lop_or(v, 0x00C000C0u, kMagic);
    if constexpr (BITS == 3) {
      t0 = lop_or(c, 0x00040004u, t0);
      t1 = lop_or(c, 0x00100010u, t1);
      t2 = lop_or(c, 0x00400040u, t2);
      t3 = lop_or(c, 0x01000100u, t3);
    }
    a0 = hsub2(t0, z.k0);
    a1 = hfma2(t1, s4, z.k1);
    a2 = hfma2(t2, s16, z.k2);
    a3 = hfma2(t3, s64, z.k3);
  } else if constexpr (BITS == 4) {  // bf16: every field shifted to bit 0
    const u32 one = 0x3F803F80u;
    a0 = bfma2(lop_or(v, 0x000F000Fu, kMagicBf16), one, z.k0);
    a1 = bfma2(lop_or(v >> 4, 0x000F000Fu, kMagicBf16), one, z.k1);
    a2 = bfma2(lop_or(v >> 8, 0x000F000Fu, kMagicBf16), one, z.k2);
    a3 = bfma2(lop_or(v >> 12, 0x000F000Fu, kMagicBf16), one, z.k3);
  } else {  // bf16 int2, int3: field 3 read two bits lower
    const u32 one = 0x3F803F80u, s4 = 0x3E803E80u, s16 = 0x3D803D80u;  // 1, 1/4, 1/16
    const u32 v2 = v >> 2;
    u32 t0 = lop_or(v, 0x00030003u, kMagicBf16), t1 = lop_or(v, 0x000C000Cu, kMagicBf16);
    u32 t2 = lop_or(v, 0x00300030u, kMagicBf16), t3 = lop_or(v2, 0x00300030u, kMagicBf16);
    if constexpr (BITS == 3) {
      t0 = lop_or(c, 0x00040004u, t0);
      t1 = lop_or(c, 0x00100010u, t1);
      t2 = lop_or(c, 0x00400040u, t2);
      t3 = lop_or(c >> 2, 0x00400040u, t3);
    }
    a0 = bfma2(t0, one, z.k0);
    a1 = bfma2(t1, s4, z.k1);
    a2 = bfma2(t2, s16, z.k2);
    a3 = bfma2(t3, s16, z.k3);
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {  // one decoded fragment serves every 8-row tile of x
    mma16816<BF16>(d[mt], a0, a1, a2, a3, upper ? b[mt].z : b[mt].x, upper ? b[mt].w : b[mt].y);
  }
}

// Four words (one 128-bit load) against the staged fragments xf (uint4 = two k-tiles' (b0, b1); the 8-row
// tile mt of x lies kChunk uint4 further per mt); int3 also takes the two high-bit words of the same eight
// k-tiles (c).
// WPG: words per group when a group is shorter than the load (group_end() after every WPG words: it folds
// the group and loads the next group's z), else 0.
template <int BITS, bool BF16, int MT, int WPG, class GroupEnd>
MACA_DEVICE void vec_mma(float (&d)[MT][4], uint4 w, uint2 c, const Zeros<BITS, BF16>& z, const uint4* xf,
                         GroupEnd&& group_end) {
  const u32 ws[4] = {w.x, w.y, w.z, w.w};
  uint4 b[MT];
  if constexpr (BITS == 4) {  // a word is one k-tile: a fragment load serves two words
#pragma unroll
    for (int i = 0; i < 4; i += 2) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) b[mt] = xf[(i / 2) * 32 + mt * kChunk];
      tile_mma<BITS, BF16, MT>(d, ws[i], 0u, z, b, false);
      if (WPG == 1) group_end();
      tile_mma<BITS, BF16, MT>(d, ws[i + 1], 0u, z, b, true);
      if (WPG && (i + 2) % WPG == 0) group_end();
    }
  } else if constexpr (BITS == 2) {  // a word is two k-tiles: fields of w, then of w >> 8
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) b[mt] = xf[i * 32 + mt * kChunk];
      tile_mma<BITS, BF16, MT>(d, ws[i], 0u, z, b, false);
      tile_mma<BITS, BF16, MT>(d, ws[i] >> 8, 0u, z, b, true);
      if (WPG && (i + 1) % WPG == 0) group_end();
    }
  } else {  // int3: low bits as int2; a high-bit word serves two low words (four k-tiles), read through
            // four shifts that put each tile's bits at 2r + 2: << 2, >> 6, << 1, >> 7
    const u32 cs[2] = {c.x, c.y};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const u32 h = cs[i / 2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) b[mt] = xf[i * 32 + mt * kChunk];
      tile_mma<BITS, BF16, MT>(d, ws[i], (i & 1) ? h << 1 : h << 2, z, b, false);
      tile_mma<BITS, BF16, MT>(d, ws[i] >> 8, (i & 1) ? h >> 7 : h >> 6, z, b, true);
      if (WPG && (i + 1) % WPG == 0) group_end();
    }
  }
}

// y[m, n] = sum_k x[m, perm[k]] (q[n, k] - z[n, g(k)]) s[n, g(k)], m < M <= 8 MT, in x's type.
// x fp16 or bf16 (BF16) [M, *] (row stride ldx); perm int [K] if gather (act-order weights: row k of the
// weight holds input feature perm[k]); words as described above (K a multiple of 4 words of k); scales fp16
// and zeros uint8 [G + 1, N_pad] (a spare row: after the last group's fold the next row is read; N_pad =
// 64 * gridDim.x, padded columns hold anything finite); y [M, N] (row stride ldy).
// CTA (bx, by) sums the K range by * k_split (a multiple of GROUP and of kPrefetch loads' k span, or
// K itself; its last chunk may be shorter than kChunk). With one range it writes y itself; otherwise every
// CTA writes its fp32 partial sums to partial [gridDim.y][M][N], and the last of a column block to arrive
// (counters[bx], zero before the launch) adds them in range order: no atomics on y, the same bits on every
// run, and no cast kernel after this one.
template <int BITS, int GROUP, bool BF16, int MT>
__device__ void gemv_mma(const u16* __restrict__ x, int ldx, const int* __restrict__ perm, int gather,
                         const uint4* __restrict__ words, const uint2* __restrict__ hwords,
                         const u16* __restrict__ scales, const unsigned char* __restrict__ zeros,
                         u16* __restrict__ y, int ldy, float* __restrict__ partial, int* __restrict__ counters,
                         int M, int N, int K, int k_split) {
  constexpr int kWordK = BITS == 4 ? 16 : 32;  // k values per (low-bits) word
  constexpr int kVecK = 4 * kWordK;            // per 128-bit load
  // a group is whole loads, or whole words that tile one load
  static_assert(GROUP % kVecK == 0 || (GROUP % kWordK == 0 && kVecK % GROUP == 0), "groups of whole words");
  static_assert(kChunk % (GROUP > kVecK ? GROUP : kVecK) == 0, "chunks of whole groups");
  constexpr int kWordsPerGroup = GROUP && GROUP < kVecK ? GROUP / kWordK : 0;  // groups inside one load
  __shared__ uint4 xs[MT][kChunk / 32][32];  // fragments of kChunk values of k: [8-row tile][k-tile pair][lane]

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int n_tile = blockIdx.x * kWarps + warp;
  const int n0 = n_tile * 16;
  const int k_begin = blockIdx.y * k_split;
  const int k_end = min(K, k_begin + k_split);
  const uint4* wp = words + ((u64)n_tile * (K / kVecK) + k_begin / kVecK) * 32 + lane;
  const uint2* hp = hwords + ((u64)n_tile * (K / kVecK) + k_begin / kVecK) * 32 + lane;  // int3 only
  const int n_pad = gridDim.x * kWarps * 16;
  const u16* s_col = scales + n0 + g;  // this lane's two columns, advanced by a row per group
  const unsigned char* z_col = zeros + n0 + g;
  const uint4* x_frag = &xs[0][0][lane];

  float acc[MT][4] = {};  // y for (n = g, m = 8 mt + 2t, 8 mt + 2t + 1) and (n = g + 8, the same m)
  float d[MT][4] = {};    // the current group's sum of x (q - z)
  const int gi = GROUP ? k_begin / GROUP : 0;
  if (GROUP) {
    s_col += (u64)gi * n_pad;
    z_col += (u64)gi * n_pad;
  }
  auto zeros_now = [&]() { return Zeros<BITS, BF16>(z_col[0], z_col[8]); };
  auto fold = [&]() {  // y += s * D for the current group, D restarts
    const float s0 = half_to_float(s_col[0]);
    const float s8 = half_to_float(s_col[8]);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      acc[mt][0] += s0 * d[mt][0];
      acc[mt][1] += s0 * d[mt][1];
      acc[mt][2] += s8 * d[mt][2];
      acc[mt][3] += s8 * d[mt][3];
      d[mt][0] = d[mt][1] = d[mt][2] = d[mt][3] = 0.f;
    }
  };
  Zeros<BITS, BF16> z = zeros_now();
  auto next_group = [&]() {  // the zeros and scales have a spare row past the end
    fold();
    s_col += n_pad;
    z_col += n_pad;
    z = zeros_now();
  };
  // Software pipeline kPrefetch loads deep: the ring holds this lane's next kPrefetch 128-bit loads, 2 KB per
  // warp in flight, 32 KB per SM at 4 CTAs; 4.3 TB/s at ~800 ns of DRAM latency needs ~26 KB per SM over 132
  // SMs (one load per lane, the earlier design, gave 16 KB at 8 CTAs). rem: the range's loads not consumed.
  int rem = (k_end - k_begin) / kVecK;
  uint4 ring[kPrefetch];
  uint2 hring[kPrefetch];
#pragma unroll
  for (int i = 0; i < kPrefetch; ++i) {
    ring[i] = i < rem ? wp[i * 32] : make_uint4(0u, 0u, 0u, 0u);
    hring[i] = BITS == 3 && i < rem ? hp[i * 32] : make_uint2(0u, 0u);
  }
  if (rem > kPrefetch) {  // wp: the next trip's loads
    wp += kPrefetch * 32;
    hp += kPrefetch * 32;
  }
  constexpr int kVecsPerGroup = GROUP >= kVecK ? GROUP / kVecK : 1;
  static_assert(kPrefetch % kVecsPerGroup == 0 && (kChunk / kVecK) % kPrefetch == 0, "whole groups per trip");

  for (int c0 = k_begin; c0 < k_end; c0 += kChunk) {
    const int c_len = min(kChunk, k_end - c0);
    __syncthreads();  // the previous chunk's fragments are no longer read
    // Rows m < M: entry (m / 8, tile pair j, lane 4 (m % 8) + tt) =
    // x[m][c0 + 32 j + 2 tt + {0, 1, 8, 9, 16, 17, 24, 25}].
    // With gather, x is gathered here (act-order at the sorted speed, with no gather kernel before this one).
    for (int e = threadIdx.x; e < (c_len / 32) * 4 * M; e += kWarps * 32) {
      const int tt = e & 3, m = (e >> 2) % M, j = (e >> 2) / M;
      const u16* xr = x + (u64)m * ldx;
      const int k = c0 + 32 * j + 2 * tt;
      u32 v[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int kk = k + (i >> 1) * 8 + (i & 1);
        v[i] = xr[gather ? perm[kk] : kk];
      }
      xs[m >> 3][j][(m & 7) * 4 + tt] = make_uint4(v[0] | (v[1] << 16), v[2] | (v[3] << 16), v[4] | (v[5] << 16),
                                                   v[6] | (v[7] << 16));
    }
    __syncthreads();
    const uint4* xf = x_frag;
    const int n_vec = c_len / kVecK;
    // one 128-bit load of the ring, refilled from wp + i if refill (i and refill: constants once inlined)
    auto step = [&](int i, bool refill) {
      const uint4 w4 = ring[i];
      const uint2 h2 = hring[i];
      if (refill) {
        ring[i] = wp[i * 32];
        if constexpr (BITS == 3) hring[i] = hp[i * 32];
      }
      vec_mma<BITS, BF16, MT, kWordsPerGroup>(d, w4, h2, z, xf, next_group);
      xf += (kVecK / 32) * 32;
      if (GROUP >= kVecK && (i + 1) % kVecsPerGroup == 0) next_group();
    };
    // The main loop: whole trips around the ring, each refilling it from wp with the next trip's loads.
    // wp moves on only while the range holds another trip, so the range's last trip re-reads its own loads
    // (L1 hits) instead of its neighbour's weights: one select per trip, no predicate per load (which would
    // keep the old and the new value of a ring slot alive at once). Ranges are whole trips (k_split_for), so
    // only the last range of K can end inside a trip, reading at most kPrefetch - 1 loads past its end (the
    // layout's spare loads).
    int v0 = 0;
    // ptxas issues a trip's loads at its start, so a loop-carried ring costs a copy per register; two trips
    // per iteration rename it instead (not at MT = 2: its registers would spill)
#pragma unroll(MT == 1 ? 2 : 1)
    for (; v0 + kPrefetch <= n_vec; v0 += kPrefetch) {
#pragma unroll
      for (int i = 0; i < kPrefetch; ++i) step(i, true);
      rem -= kPrefetch;
      const int advance = rem > kPrefetch ? kPrefetch * 32 : 0;
      wp += advance;
      if constexpr (BITS == 3) hp += advance;
    }
#pragma unroll
    for (int i = 0; i < kPrefetch; ++i) {  // the end of K inside a trip: nothing left to load
      if (v0 + i < n_vec) step(i, false);
    }
  }
  if (!GROUP) fold();
  const bool split = gridDim.y > 1;
  float* part = partial + (u64)blockIdx.y * M * N;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = n0 + g + 8 * h;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int m = 8 * mt + 2 * t + e;
        if (n >= N || m >= M) continue;
        if (split) {
          part[(u64)m * N + n] = acc[mt][2 * h + e];
        } else {
          y[(u64)m * ldy + n] = to_x<BF16>(acc[mt][2 * h + e]);
        }
      }
    }
  }
  if (!split) return;
  // The last CTA of this column block to arrive adds the partial sums (the threadfence pattern: each CTA's
  // stores are visible device-wide before its arrival is counted).
  __shared__ int last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counters + blockIdx.x, 1) == int(gridDim.y) - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  const int nb = blockIdx.x * kWarps * 16;
  for (int e = threadIdx.x; e < M * kWarps * 16; e += kWarps * 32) {
    const int m = e / (kWarps * 16), n = nb + e % (kWarps * 16);
    if (n >= N) continue;
    float sum = 0.f;
    for (int r = 0; r < int(gridDim.y); ++r) sum += load_l2(partial + ((u64)r * M + m) * N + n);  // range order
    y[(u64)m * ldy + n] = to_x<BF16>(sum);
  }
}

// kMinCtas in the launch bounds: without it ptxas chose 64 registers for some variants and spilled in the
// main loop; with it, up to 65536 / (128 kMinCtas) = 128.
#define MACA_GEMV_MMA(NAME, BITS, GROUP, BF16, MT)                                                            \
  extern "C" __global__ void __launch_bounds__(kWarps * 32, kMinCtas) NAME(                                   \
      const u16* x, int ldx, const int* perm, int gather, const uint4* words, const uint2* hwords,           \
      const u16* scales, const unsigned char* zeros, u16* y, int ldy, float* partial, int* counters, int M,   \
      int N, int K, int k_split) {                                                                            \
    gemv_mma<BITS, GROUP, BF16, MT>(x, ldx, perm, gather, words, hwords, scales, zeros, y, ldy, partial,      \
                                    counters, M, N, K, k_split);                                              \
  }

// MACA_INSTANTIATIONS: every kernel below (nvcc, the compile tier). cuda_kernel.py compiles one kernel per
// NVRTC program: the text above this line plus its own MACA_GEMV_MMA line (a whole-file compile takes ~6 s).
// One kernel per (bits, group, x dtype, rows of x): GROUP 0 is one group over all of K (group_size = -1 or K),
// other group sizes take the Triton kernels; _m16 runs 9..16 rows (two 8-row tiles per decoded fragment).
#define MACA_GEMV_MMA_ROWS(NAME, BITS, GROUP, BF16) \
  MACA_GEMV_MMA(NAME, BITS, GROUP, BF16, 1)         \
  MACA_GEMV_MMA(NAME##_m16, BITS, GROUP, BF16, 2)

MACA_GEMV_MMA_ROWS(maca_gemv_mma_b4_g0, 4, 0, false)
MACA_GEMV_MMA_ROWS(maca_gemv_mma_b4_g32, 4, 32, false)
MACA_GEMV_MMA_ROWS(maca_gemv_mma_b4_g64, 4, 64, false)
MACA_GEMV_MMA_ROWS(maca_gemv_mma_b4_g128, 4, 128, false)
MACA_GEMV_MMA_ROWS(maca_gemv_mma_b3_g0, 3, 0, false)
MACA_GEMV_MMA_ROWS(maca_gemv_mma_b3_g128, 3, 128, false)
MACA_GEMV_MMA_ROWS(maca_gemv_mma_b2_g0, 2, 0, false)
MACA_GEMV_MMA_ROWS(maca_gemv_mma_b2_g128, 2, 128, false)
MACA_GEMV_MMA_ROWS(maca_gemv_mma_bf16_b4_g0, 4, 0, true)
MACA_GEMV_MMA_ROWS(maca_gemv_mma_bf16_b4_g32, 4, 32, true)
MACA_GEMV_MMA_ROWS(maca_gemv_mma_bf16_b4_g64, 4, 64, true)
MACA_GEMV_MMA_ROWS(maca_gemv_mma_bf16_b4_g128, 4, 128, true)
MACA_GEMV_MMA_ROWS(maca_gemv_mma_bf16_b3_g0, 3, 0, true)
MACA_GEMV_MMA_ROWS(maca_gemv_mma_bf16_b3_g128, 3, 128, true)
MACA_GEMV_MMA_ROWS(maca_gemv_mma_bf16_b2_g0, 2, 0, true)
MACA_GEMV_MMA_ROWS(maca_gemv_mma_bf16_b2_g128, 2, 128, true)
