// Packed int4 / int3 / int2 GEMV (M <= 16 rows of fp16 or bf16 x) on tensor cores, on the "mma" layout.
//
// Self-contained (no headers): compiled at run time by NVRTC (maca_kernels/ops/quant_matmul/cuda_kernel.py)
// and by nvcc for the compile tier (tests/test_cuda_compile_tier.py), which counts the SASS each warp executes;
// g++ runs it on the CPU for the tests with tests/ops/quant_matmul/cuda_host.h standing in for CUDA.
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
// load is 512 contiguous bytes. kPrefetch spare warp loads follow the last n tile, so the loads that run ahead
// never need a bounds check.
// k order: within each 32 values of k (a pair of k-tiles) the layout assigns lane t the features 8t .. 8t + 7
// (tile 0's b0, b1 = 8t + {0, 1}, {2, 3}; tile 1's = {4, 5}, {6, 7}), so a lane's B fragments of a tile pair
// are one 128-bit load of x in its own order: no staging, no shuffling.
// Scales and zeros: [n tile][G][g][2], the columns g and g + 8 of a lane side by side (fp16 pairs: one
// 32-bit load; zeros uint8 pairs: one 16-bit load), a tile's groups one after another (a trip's groups are
// immediate offsets from one address).
//
// Work split: a CTA is one 16-column tile; its warps (blockDim.x / 32 "slices") each take one range of K and
// add their sums in shared memory at the end, in slice order (the same bits on every run). x is read straight
// from global memory (L1-resident: every warp of the SM reads the same rows). With act-order weights (gather)
// each warp gathers x into its own shared memory, one trip of the load ring at a time. B columns m >= M read
// row M - 1 (or hold whatever is in shared memory): their D columns are never stored.
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
#define MACA_DYNAMIC_SHARED(T, name) extern __shared__ T name[]

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

// x's B fragments: 16 bytes from global (or, staged for gather, shared) memory. volatile: kept in program order
// with the mma's, so ptxas cannot hoist a whole trip's loads (32 per lane at int2) into registers at once.
MACA_DEVICE uint4 load_x(const uint4* p) {
  uint4 v;
  asm volatile("ld.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// A group's scales (an fp16 pair) and zero points (a uint8 pair), volatile for the same reason as load_x.
MACA_DEVICE u32 load_u32(const u32* p) {
  u32 v;
  asm volatile("ld.global.nc.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

MACA_DEVICE u32 load_u16(const u16* p) {
  u16 v;
  asm volatile("ld.global.nc.u16 %0, [%1];" : "=h"(v) : "l"(p));
  return v;
}

#endif  // MACA_HOST_EMULATION

constexpr u32 kMagic = 0x64006400u;      // 1024.0 in both fp16 halves
constexpr u32 kMagicBf16 = 0x43004300u;  // 128.0 in both bf16 halves (7-bit mantissa: fields stay below bit 7)
constexpr int kMaxSlices = 8;  // warps per CTA (cuda_kernel.MAX_SLICES)
constexpr int kMinCtas = 1;    // CTAs of kMaxSlices warps per SM the registers must allow: up to 255 each

// 128-bit loads in flight per lane (mma_layout.PREFETCH is the larger): 4 KB per warp at one 8-row tile of x;
// 4.3 TB/s at ~700 ns of DRAM latency needs ~23 KB per SM over 132 SMs, i.e. 6 warps. Two tiles (9..16 rows)
// keep 4, which their registers allow.
template <int MT>
struct Prefetch {
  static constexpr int kLoads = MT == 1 ? 8 : 4;
};

// Per-lane constants of one group: the negated offset (2^-s * magic + z) of every scale variant s, in both
// halves (c * 0x10001: one IMAD with the pair's constant). fp16: scales 1, 1/16 (int4) and 1, 1/4, 1/16, 1/64
// (int2/int3). bf16 has no room for the x16 fields (its mantissa has 7 bits), so int4 shifts every field to
// bit 0 (scale 1) and int2/int3 read field 3 two bits lower (scale 1/16 like field 2).
template <int BITS, bool BF16>
struct Zeros {
  u32 k0, k1, k2, k3;  // fragment registers a0..a3 (n = g, g + 8, g, g + 8)
  MACA_DEVICE explicit Zeros(u32 zp = 0u) {  // zp: the zero points of columns g (bits 0..7) and g + 8 (8..15)
    const u32 zg = zp & 0xFFu, zg8 = zp >> 8;
    if constexpr (BF16) {
      k0 = zg * 0x10001u + 0xC300C300u;                                                 // -(128 + z) (ulp 1)
      k1 = BITS == 4 ? zg8 * 0x10001u + 0xC300C300u : zg8 * 0x40004u + 0xC200C200u;  // int2/3: -(32 + z) (ulp 1/4)
      k2 = BITS == 4 ? k0 : zg * 0x100010u + 0xC100C100u;  // int2/3: -(8 + z) (ulp 1/16; z = 8: -16)
      k3 = BITS == 4 ? k1 : zg8 * 0x100010u + 0xC100C100u;
    } else {
      k0 = zg * 0x10001u + 0x64006400u;  // 1024 + z (ulp 1), subtracted
      k1 = BITS == 4 ? zg8 * 0x100010u + 0xD400D400u : zg8 * 0x40004u + 0xDC00DC00u;  // -(64 + z) / -(256 + z)
      k2 = BITS == 4 ? k0 : zg * 0x100010u + 0xD400D400u;   // -(64 + z)
      k3 = BITS == 4 ? k1 : zg8 * 0x400040u + 0xCC00CC00u;  // -(16 + z) (ulp 1/64)
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

// Four words (one 128-bit load) against x's B fragments: xb[mt] points at this lane's first uint4 of the load's
// k span in 8-row tile mt (a uint4 = one tile pair's (b0, b1) x 2; pairs 4 uint4 apart); int3 also takes the two
// high-bit words of the same eight k-tiles (c).
// WPG: words per group when a group is shorter than the load (group_end(more) after every WPG words: it folds
// the group and, if more words of this load follow, loads the next group's z), else 0.
template <int BITS, bool BF16, int MT, int WPG, class GroupEnd>
MACA_DEVICE void vec_mma(float (&d)[MT][4], uint4 w, uint2 c, const Zeros<BITS, BF16>& z,
                         const uint4* const (&xb)[MT], GroupEnd&& group_end) {
  const u32 ws[4] = {w.x, w.y, w.z, w.w};
  uint4 b[MT];
  if constexpr (BITS == 4) {  // a word is one k-tile: a fragment load serves two words
#pragma unroll
    for (int i = 0; i < 4; i += 2) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) b[mt] = load_x(xb[mt] + (i / 2) * 4);
      tile_mma<BITS, BF16, MT>(d, ws[i], 0u, z, b, false);
      if (WPG == 1) group_end(true);
      tile_mma<BITS, BF16, MT>(d, ws[i + 1], 0u, z, b, true);
      if (WPG && (i + 2) % WPG == 0) group_end(i + 2 < 4);
    }
  } else if constexpr (BITS == 2) {  // a word is two k-tiles: fields of w, then of w >> 8
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) b[mt] = load_x(xb[mt] + i * 4);
      tile_mma<BITS, BF16, MT>(d, ws[i], 0u, z, b, false);
      tile_mma<BITS, BF16, MT>(d, ws[i] >> 8, 0u, z, b, true);
      if (WPG && (i + 1) % WPG == 0) group_end(i + 1 < 4);
    }
  } else {  // int3: low bits as int2; a high-bit word serves two low words (four k-tiles), read through
            // four shifts that put each tile's bits at 2r + 2: << 2, >> 6, << 1, >> 7
    const u32 cs[2] = {c.x, c.y};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const u32 h = cs[i / 2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) b[mt] = load_x(xb[mt] + i * 4);
      tile_mma<BITS, BF16, MT>(d, ws[i], (i & 1) ? h << 1 : h << 2, z, b, false);
      tile_mma<BITS, BF16, MT>(d, ws[i] >> 8, (i & 1) ? h >> 7 : h >> 6, z, b, true);
      if (WPG && (i + 1) % WPG == 0) group_end(i + 1 < 4);
    }
  }
}

// The sums of one warp: acc[mt] = this lane's y (see gemv_mma) over the warp's range of K, x read from global
// memory (GATHER false) or gathered by perm into this warp's shared memory one trip at a time (GATHER true).
template <int BITS, int GROUP, bool BF16, int MT, bool GATHER>
MACA_DEVICE void warp_sums(float (&acc)[MT][4], const u16* __restrict__ x, int ldx, const int* __restrict__ perm,
                           const uint4* __restrict__ words, const uint2* __restrict__ hwords,
                           const u32* __restrict__ scales, const u16* __restrict__ zeros, int M, u32 K, u32 k_begin,
                           u32 k_end, uint4* staged) {
  constexpr int kPrefetch = Prefetch<MT>::kLoads;
  constexpr u32 kWordK = BITS == 4 ? 16 : 32;  // k values per (low-bits) word
  constexpr u32 kVecK = 4 * kWordK;            // per 128-bit load
  constexpr u32 kTripK = kPrefetch * kVecK;    // per trip around the load ring
  // a group is whole loads, or whole words that tile one load
  static_assert(GROUP % kVecK == 0 || (GROUP % kWordK == 0 && kVecK % GROUP == 0), "groups of whole words");
  constexpr int kWordsPerGroup = GROUP && GROUP < kVecK ? GROUP / kWordK : 0;  // groups inside one load
  constexpr int kVecsPerGroup = GROUP >= kVecK ? GROUP / kVecK : 1;
  static_assert(kPrefetch % kVecsPerGroup == 0 || kVecsPerGroup % kPrefetch == 0, "groups align with trips");

  const int lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const u32 n_tile = blockIdx.x;
  const uint4* wp = words + ((u64)n_tile * (K / kVecK) + k_begin / kVecK) * 32 + lane;
  const uint2* hp = hwords + ((u64)n_tile * (K / kVecK) + k_begin / kVecK) * 32 + lane;  // int3 only
  // this lane's two columns' scales and zeros: [n tile][group][g], a group 8 pairs after the last
  const u32 groups = GROUP ? K / GROUP : 1;  // per tile
  const u64 sz = ((u64)n_tile * groups + (GROUP ? k_begin / GROUP : 0)) * 8 + g;
  const u32* s_pair = scales + sz;
  const u16* z_pair = zeros + sz;

  float d[MT][4] = {};  // the current group's sum of x (q - z)
  auto fold = [&]() {   // y += s * D for the current group, D restarts
    const u32 sp = load_u32(s_pair);
    const float s0 = half_to_float(sp & 0xFFFFu);
    const float s8 = half_to_float(sp >> 16);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      acc[mt][0] += s0 * d[mt][0];
      acc[mt][1] += s0 * d[mt][1];
      acc[mt][2] += s8 * d[mt][2];
      acc[mt][3] += s8 * d[mt][3];
      d[mt][0] = d[mt][1] = d[mt][2] = d[mt][3] = 0.f;
    }
  };
  // a group's zero constants when it starts (never past the last group), its fold when it ends
  Zeros<BITS, BF16> z;
  auto begin_group = [&]() { z = Zeros<BITS, BF16>(load_u16(z_pair)); };
  auto end_group = [&]() {
    fold();
    s_pair += 8;
    z_pair += 8;
  };
  auto group_end = [&](bool more) {  // inside a load
    end_group();
    if (more) begin_group();
  };
  if (!GROUP) begin_group();
  // Software pipeline kPrefetch loads deep: the ring holds this lane's next kPrefetch 128-bit loads.
  // rem: the range's loads not consumed.
  int rem = (k_end - k_begin) / kVecK;
  uint4 ring[kPrefetch];
  uint2 hring[kPrefetch];
#pragma unroll
  for (int i = 0; i < kPrefetch; ++i) {  // past the range: the next range's loads or the layout's spares, unused
    ring[i] = wp[i * 32];
    hring[i] = BITS == 3 ? hp[i * 32] : make_uint2(0u, 0u);
  }
  if (rem > kPrefetch) {  // wp: the next trip's loads
    wp += kPrefetch * 32;
    hp += kPrefetch * 32;
  }
  // This lane's B fragments: row 8 mt + g (rows past M read row M - 1), t's 8 values of each tile pair, from
  // k_begin on in x, or from the start of the staged trip.
  const uint4* xb[MT];
  auto x_rows = [&]() {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int m = min(8 * mt + g, M - 1);
      xb[mt] = GATHER ? staged + m * (kTripK / 8) + t : reinterpret_cast<const uint4*>(x + (u64)m * ldx + k_begin) + t;
    }
  };
  // one 128-bit load of the ring, refilled from wp + i if refill (i and refill: constants once inlined)
  auto step = [&](int i, bool refill) {
    const uint4 w4 = ring[i];
    const uint2 h2 = hring[i];
    if (refill) {
      ring[i] = wp[i * 32];
      if constexpr (BITS == 3) hring[i] = hp[i * 32];
    }
    if (GROUP && i % kVecsPerGroup == 0) begin_group();  // a load that starts a group
    vec_mma<BITS, BF16, MT, kWordsPerGroup>(d, w4, h2, z, xb, group_end);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) xb[mt] += kVecK / 8;
    if (GROUP >= kVecK && (i + 1) % kVecsPerGroup == 0) end_group();
  };
  // n_vec loads: whole trips around the ring, each refilling it from wp with the next trip's loads. wp moves on
  // only while the range holds another trip, so the range's last trip re-reads its own loads (L1 hits) instead
  // of the next range's: one select per trip, no predicate per load. A range that ends inside a trip reads at
  // most kPrefetch - 1 loads past its end (the next range's, or the layout's spare loads).
  auto pass = [&](int n_vec) {
    auto trip = [&]() {
#pragma unroll
      for (int i = 0; i < kPrefetch; ++i) step(i, true);
      rem -= kPrefetch;
      const int advance = rem > kPrefetch ? kPrefetch * 32 : 0;
      wp += advance;
      if constexpr (BITS == 3) hp += advance;
    };
    auto tail = [&](int v0) {  // the end of the range inside a trip: nothing left to load
      if (v0 < n_vec) {
#pragma unroll
        for (int i = 0; i < kPrefetch; ++i) {
          if (v0 + i < n_vec) step(i, false);
        }
      }
    };
    // ptxas issues a trip's loads at its start, so a loop-carried ring costs a copy per register; two trips per
    // iteration rename it instead. An odd trip is straight-line code with its own copy of the tail: a one-trip
    // loop, or paths joining before the tail, copied the ring.
    int v0 = 0;
    for (; v0 + 2 * kPrefetch <= n_vec; v0 += 2 * kPrefetch) {
      trip();
      trip();
    }
    if (v0 + kPrefetch <= n_vec) {
      trip();
      tail(v0 + kPrefetch);
    } else {
      tail(v0);
    }
  };
  if constexpr (GATHER) {  // one trip at a time: entry (m, q) = x[m][perm[c0 + 8 q .. 8 q + 7]]
    for (u32 c0 = k_begin; c0 < k_end; c0 += kTripK) {
      const u32 c_len = min(kTripK, k_end - c0);
      __syncwarp();  // the previous trip's fragments are no longer read
      for (u32 e = lane; e < M * (c_len / 8); e += 32) {
        const u32 m = e / (c_len / 8), q = e % (c_len / 8);
        const u16* xr = x + (u64)m * ldx;
        const int* pk = perm + c0 + 8 * q;
        u32 v[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = xr[pk[i]];
        staged[m * (kTripK / 8) + q] = make_uint4(v[0] | (v[1] << 16), v[2] | (v[3] << 16), v[4] | (v[5] << 16),
                                                  v[6] | (v[7] << 16));
      }
      __syncwarp();
      x_rows();
      pass(c_len / kVecK);
    }
  } else {
    x_rows();
    pass((k_end - k_begin) / kVecK);
  }
  if (!GROUP) fold();
}

// y[m, n] = sum_k x[m, perm[k]] (q[n, k] - z[n, g(k)]) s[n, g(k)], m < M <= 8 MT, in x's type.
// x fp16 or bf16 (BF16) [M, *] (row stride ldx, a multiple of 8; 16-byte aligned); perm int [K] if gather
// (act-order weights: row k of the weight holds input feature perm[k]); words as described above (K a multiple
// of 4 words of k); scales fp16 pairs and zeros uint8 pairs [N_pad / 16][G][8] (padded columns hold anything
// finite); y [M, N] (row stride ldy).
// CTA bx computes columns 16 bx .. 16 bx + 15; its warp w sums the K range [w k_slice, (w + 1) k_slice) (a
// multiple of GROUP and of one load's k; the last may be shorter or empty). With gather, each warp stages its
// x in dynamic shared memory: M rows of one trip's k (the launcher sizes it: cuda_kernel.launch_plan).
template <int BITS, int GROUP, bool BF16, int MT>
__device__ void gemv_mma(const u16* __restrict__ x, int ldx, const int* __restrict__ perm, int gather,
                         const uint4* __restrict__ words, const uint2* __restrict__ hwords,
                         const u32* __restrict__ scales, const u16* __restrict__ zeros, u16* __restrict__ y, int ldy,
                         int M, int N, int K, int k_slice) {
  constexpr u32 kTripK = Prefetch<MT>::kLoads * (BITS == 4 ? 64 : 128);
  MACA_DYNAMIC_SHARED(uint4, smem);  // gather: [slice][m < M][kTripK / 8]; then the slices' sums (see below)
  const int lane = threadIdx.x & 31;
  const int slice = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const u64 start = (u64)slice * k_slice, stop = start + k_slice;  // 64-bit: may pass 2^31 for the last slices
  const u32 k_begin = start < (u64)K ? (u32)start : (u32)K;
  const u32 k_end = stop < (u64)K ? (u32)stop : (u32)K;
  float acc[MT][4] = {};  // y for (n = g, m = 8 mt + 2t, 8 mt + 2t + 1) and (n = g + 8, the same m)
  if (gather) {
    warp_sums<BITS, GROUP, BF16, MT, true>(acc, x, ldx, perm, words, hwords, scales, zeros, M, K, k_begin, k_end,
                                           smem + (u64)slice * M * (kTripK / 8));
  } else {
    warp_sums<BITS, GROUP, BF16, MT, false>(acc, x, ldx, perm, words, hwords, scales, zeros, M, K, k_begin, k_end,
                                            smem);
  }
  // The slices' sums: slice s > 0 leaves its acc in shared memory ([s - 1][mt][lane] float4s, after any staging
  // is done with), slice 0 adds them in slice order and stores y.
  const int slices = blockDim.x >> 5;
  if (slices > 1) {
    float4* red = reinterpret_cast<float4*>(smem);
    if (gather) __syncthreads();  // every slice's staged x is no longer read
    if (slice > 0) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        red[((slice - 1) * MT + mt) * 32 + lane] = make_float4(acc[mt][0], acc[mt][1], acc[mt][2], acc[mt][3]);
      }
    }
    __syncthreads();
    if (slice > 0) return;
    for (int s = 0; s < slices - 1; ++s) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const float4 v = red[(s * MT + mt) * 32 + lane];
        acc[mt][0] += v.x;
        acc[mt][1] += v.y;
        acc[mt][2] += v.z;
        acc[mt][3] += v.w;
      }
    }
  }
  const int n = blockIdx.x * 16 + g;  // this lane's columns n and n + 8, rows 8 mt + 2t + e
  u16* yp = y + (u64)(2 * t) * ldy + n;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      if (8 * mt + 2 * t + e >= M) continue;
      u16* row = yp + (8 * mt + e) * ldy;
      if (n < N) row[0] = to_x<BF16>(acc[mt][e]);
      if (n + 8 < N) row[8] = to_x<BF16>(acc[mt][2 + e]);
    }
  }
}

// Launch bounds: kMaxSlices warps, kMinCtas of them per SM. The ring and a trip's x fragments take ptxas to
// 200-255 registers at groups of 128 or fewer (no spills): 8 warps per SM, the slicing's aim. With 128 as the
// limit (2 CTAs of 8 warps) the grouped variants spilled.
#define MACA_GEMV_MMA(NAME, BITS, GROUP, BF16, MT)                                                            \
  extern "C" __global__ void __launch_bounds__(kMaxSlices * 32, kMinCtas) NAME(                               \
      const u16* x, int ldx, const int* perm, int gather, const uint4* words, const uint2* hwords,           \
      const u32* scales, const u16* zeros, u16* y, int ldy, int M, int N, int K, int k_slice) {               \
    gemv_mma<BITS, GROUP, BF16, MT>(x, ldx, perm, gather, words, hwords, scales, zeros, y, ldy, M, N, K,      \
                                    k_slice);                                                                 \
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
