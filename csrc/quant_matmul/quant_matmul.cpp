// Packed low-bit matmul y = x @ dequant(W)^T from GPTQ checkpoint tensors (see quant_matmul.h).
//
// Two paths, both parallel over N in chunks of whole 16-column panels (common/parallel.h: the caller and any
// helper that gets scheduled claim chunks; each chunk streams its own columns of qweight once per pass, and
// every output element is computed the same way whichever thread runs its chunk):
//
//  * GEMV path (M <= kGemvMaxM, groups k / gs with gs a multiple of the packing run, AVX2 builds).
//    qweight is streamed row by row (a row of words holds one packing run of every column); the words
//    are decoded in registers and FMA'd against broadcast x values, eight columns per ymm, sixteen per
//    step. Zero point and scale are factored out of each group's sum:
//        sum_{k in g} x_k (c_k - z) s  =  s * (sum_{k in g} x_k c_k  -  z * sum_{k in g} x_k),
//    and a field that sits inside its word is only masked, not shifted: it converts to c * 2^shift
//    exactly, and x was pre-scaled by 2^-shift (exact powers of two, with a per-row exponent offset that
//    keeps every pre-scaled value a normal float). So the inner loop is mask, convert, FMA per eight
//    weights; the group fold happens on the group's last packed row. Group sums live in an L1 scratch,
//    output rows in L1/L2. Rows are handled in passes of kGemvMR.
//
//  * Tile path (larger M, act-order or uneven g_idx, any group size; the whole job in portable builds).
//    A K-block x N-block tile of W is dequantized exactly to fp32 once (w = c*s - z*s, per-k group
//    lookup), laid out as 16-column panels, then a 6x16 register-blocked micro-kernel runs over all rows
//    of x (in blocks of kTileRows so that x, y and the tile stay in L2).
//
// Dequantized weights are exact in fp32: (c - z) is a small integer and s an fp16 value. Both paths
// accumulate in fp32.
#include "quant_matmul.h"

#include "common/float_buffer.h"
#include "common/fp16.h"
#include "common/parallel.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <utility>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MACA_QMM_AVX2 1
#else
#define MACA_QMM_AVX2 0
#endif

#if defined(__GNUC__)
#define MACA_INLINE inline __attribute__((always_inline))
#else
#define MACA_INLINE inline
#endif

namespace maca {
namespace {

// ---------------------------------------------------------------------------------------------
// Blocking parameters (Zen 3: 32 KB L1d, 512 KB-1 MB L2 per core).
// ---------------------------------------------------------------------------------------------
constexpr int64_t kPanel = 16;        // tile path: columns per packed panel (two ymm)
constexpr int64_t kTileCols = 128;    // tile path: columns per tile (8 panels)
constexpr int64_t kTileK = 256;       // tile path: k per tile; a multiple of every packing run (32)
constexpr int64_t kTileRows = 192;    // tile path: rows of x per pass over a column block
constexpr int kMR = 6;                // tile path: rows of the register tile
constexpr int64_t kGemvMaxM = 12;     // GEMV path for M <= this (in passes of kGemvMR rows)
constexpr int kGemvMR = 4;            // rows handled per GEMV pass
constexpr int64_t kGemvCols = 1024;   // GEMV path: columns per block (group sums stay in L1)
constexpr int64_t kGemvPrefetchRuns = 2;  // GEMV path: software prefetch distance in packed runs
// Work-sharing chunks (columns, multiples of kPanel): about four per thread, so that a late or preempted
// helper leaves little for the others to wait for, but no narrower than kGemvMinChunk: every packed row
// of a chunk is one contiguous stretch of memory, and short stretches stream from DRAM less efficiently.
// One thread: one chunk (the whole GEMV in kGemvCols blocks, as before).
constexpr int64_t kGemvMinChunk = 128, kGemvMaxChunk = 512;
constexpr int64_t kTileChunkCols = kTileCols;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// Scalar helpers
// ---------------------------------------------------------------------------------------------
// Value j of a little-endian bit stream of 32-bit words that lie `stride` elements apart: a qweight
// column (stride N, along K) or a qzeros row (stride 1, along N). Values may straddle two words (3-bit).
inline uint32_t stream_field(const int32_t* base, int64_t stride, int64_t j, int bits) {
  const int64_t bit = j * bits;
  const int64_t word = bit >> 5;
  const int shift = static_cast<int>(bit & 31);
  uint32_t v = static_cast<uint32_t>(base[word * stride]) >> shift;
  if (shift + bits > 32) v |= static_cast<uint32_t>(base[(word + 1) * stride]) << (32 - shift);
  return v & ((1u << bits) - 1u);
}

// Values per packing run and words per run (a run is one qweight row for 2/4/8 bits, three for 3).
constexpr int run_values(int bits) { return bits == 3 ? 32 : 32 / bits; }
constexpr int run_words(int bits) { return bits == 3 ? 3 : 1; }

// ---------------------------------------------------------------------------------------------
// Shared problem description (after validation and x conversion)
// ---------------------------------------------------------------------------------------------
struct Problem {
  const float* x;  // fp32 activations, rows ldx apart
  int64_t ldx;
  float* y;
  int64_t ldy;
  int64_t M, N, K, G;
  const int32_t* qw;
  const int32_t* qz;
  const uint16_t* sc;
  const int32_t* g_idx;  // null when groups are sorted: g(k) = k / gs
  int64_t gs;
  int bits;
  int zero_offset;
  int64_t zwords;        // words per qzeros row: N * bits / 32
  const float* xq;          // GEMV path: x * 2^(t_m - field_exp(k % run)) (exact); rows in passes of
                            // kGemvMR, each pass [K][rows] (k-major) starting at m0 * K
  const float* xq_unscale;  // GEMV path: [M] 2^-t_m
  const float* xsum;        // GEMV path: [M][n_groups] sums of x * 2^t_m over each group
  int64_t n_groups;      // groups touched by K when sorted: ceil(K / gs)

  int64_t group_of(int64_t k) const { return g_idx ? g_idx[k] : k / gs; }
  float zero(int64_t g, int64_t n) const {
    return static_cast<float>(static_cast<int64_t>(stream_field(qz + g * zwords, 1, n, bits)) + zero_offset);
  }
};

// =============================================================================================
// Tile path
// =============================================================================================
struct TileScratch {
  FloatBuffer tab_s;   // [G][kTileCols] scales of the current column block (0 beyond N)
  FloatBuffer tab_zs;  // [G][kTileCols] -zero*scale
  FloatBuffer tile;    // [panels][kTileK][kPanel] dequantized W^T
};

void build_tables(const Problem& p, int64_t cb, int64_t nb, float* tab_s, float* tab_zs) {
  for (int64_t g = 0; g < p.G; ++g) {
    float* s = tab_s + g * kTileCols;
    float* zs = tab_zs + g * kTileCols;
    for (int64_t j = 0; j < kTileCols; ++j) {
      if (j < nb) {
        const float scale = half_to_float(p.sc[g * p.N + cb + j]);
        s[j] = scale;
        zs[j] = -p.zero(g, cb + j) * scale;  // exact: small integer times an fp16 value
      } else {
        s[j] = 0.0f;
        zs[j] = 0.0f;
      }
    }
  }
}

// Scalar decode of tile columns [j0, j1) (relative to cb) for k in [k0, k0 + kc); columns beyond nb
// are written as zeros.
void decode_tile_scalar(const Problem& p, int64_t cb, int64_t nb, int64_t k0, int64_t kc, int64_t j0, int64_t j1,
                        const float* tab_s, const float* tab_zs, float* tile) {
  int64_t tab_off[kTileK];  // group row of each k in the tables
  for (int64_t kk = 0; kk < kc; ++kk) tab_off[kk] = p.group_of(k0 + kk) * kTileCols;
  for (int64_t j = j0; j < j1; ++j) {
    float* dst = tile + (j / kPanel) * kc * kPanel + (j % kPanel);
    if (j >= nb) {
      for (int64_t kk = 0; kk < kc; ++kk) dst[kk * kPanel] = 0.0f;
      continue;
    }
    const int32_t* col = p.qw + cb + j;
    for (int64_t kk = 0; kk < kc; ++kk) {
      const float code = static_cast<float>(stream_field(col, p.N, k0 + kk, p.bits));
      dst[kk * kPanel] = code * tab_s[tab_off[kk] + j] + tab_zs[tab_off[kk] + j];
    }
  }
}

#if MACA_QMM_AVX2
// Value J of a packing run held in words w[0..run_words), as 8 int32 lanes.
template <int BITS, int J>
MACA_INLINE __m256i extract_code(const __m256i* w) {
  constexpr int bit = J * BITS;
  constexpr int word = bit / 32;
  constexpr int shift = bit % 32;
  __m256i v = shift ? _mm256_srli_epi32(w[word], shift) : w[word];
  if constexpr (shift + BITS > 32) {
    v = _mm256_or_si256(v, _mm256_slli_epi32(w[word + 1], 32 - shift));
  }
  if constexpr (shift + BITS != 32) {  // the top field of a word needs no mask after the shift
    v = _mm256_and_si256(v, _mm256_set1_epi32((1 << BITS) - 1));
  }
  return v;
}

// tab_off[kk]: offset of the group row of k0 + kk in the tables (g * kTileCols).
template <int BITS, int J>
MACA_INLINE void decode_one(const __m256i* w, const int64_t* tab_off, int64_t kk, int64_t j, const float* tab_s,
                            const float* tab_zs, float* dst) {
  const int64_t off = tab_off[kk + J] + j;
  const __m256 code = _mm256_cvtepi32_ps(extract_code<BITS, J>(w));
  const __m256 v = _mm256_fmadd_ps(code, _mm256_loadu_ps(tab_s + off), _mm256_loadu_ps(tab_zs + off));
  _mm256_storeu_ps(dst + (kk + J) * kPanel, v);
}

template <int BITS, int... J>
MACA_INLINE void decode_run(const __m256i* w, const int64_t* tab_off, int64_t kk, int64_t j, const float* tab_s,
                            const float* tab_zs, float* dst, std::integer_sequence<int, J...>) {
  (decode_one<BITS, J>(w, tab_off, kk, j, tab_s, tab_zs, dst), ...);
}

template <int BITS>
void decode_tile_avx2(const Problem& p, int64_t cb, int64_t nb, int64_t k0, int64_t kc, const float* tab_s,
                      const float* tab_zs, float* tile) {
  constexpr int P = run_values(BITS);
  constexpr int W = run_words(BITS);
  const int64_t full = nb / 8 * 8;  // columns decodable eight at a time without reading past N
  int64_t tab_off[kTileK];
  for (int64_t kk = 0; kk < kc; ++kk) tab_off[kk] = p.group_of(k0 + kk) * kTileCols;
  const int64_t N = p.N;
  for (int64_t j = 0; j < full; j += 8) {  // eight columns at a time, down the tile's k range
    float* dst = tile + (j / kPanel) * kc * kPanel + (j % kPanel);
    const int32_t* col = p.qw + (k0 / P) * W * N + cb + j;
    for (int64_t kk = 0; kk < kc; kk += P, col += W * N) {
      __m256i w[W];
      for (int i = 0; i < W; ++i) w[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + i * N));
      decode_run<BITS>(w, tab_off, kk, j, tab_s, tab_zs, dst, std::make_integer_sequence<int, P>{});
    }
  }
  const int64_t padded = ceil_div(nb, kPanel) * kPanel;
  if (full < padded) decode_tile_scalar(p, cb, nb, k0, kc, full, padded, tab_s, tab_zs, tile);
}

// y[0:MR, 0:ncols] (=|+=) x[0:MR, 0:kc] @ panel[0:kc, 0:16]. Named accumulators (not arrays), so that
// they stay in registers: 12 accumulators + 2 panel vectors + 1 broadcast = 15 of the 16 ymm registers.
template <int MR>
void micro_avx2(const float* x, int64_t ldx, const float* b, int64_t kc, float* y, int64_t ldy, int64_t ncols,
                bool first) {
  static_assert(MR >= 1 && MR <= 6, "register tile has 1..6 rows");
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
  __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(), c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
  __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps(), c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  // Rows past MR are never read; their pointers alias row 0 so that no out-of-range address is formed.
  const float* x0 = x;
  const float* x1 = MR > 1 ? x + 1 * ldx : x;
  const float* x2 = MR > 2 ? x + 2 * ldx : x;
  const float* x3 = MR > 3 ? x + 3 * ldx : x;
  const float* x4 = MR > 4 ? x + 4 * ldx : x;
  const float* x5 = MR > 5 ? x + 5 * ldx : x;
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b + k * kPanel);
    const __m256 b1 = _mm256_loadu_ps(b + k * kPanel + 8);
    __m256 a = _mm256_broadcast_ss(x0 + k);
    c00 = _mm256_fmadd_ps(a, b0, c00);
    c01 = _mm256_fmadd_ps(a, b1, c01);
    if constexpr (MR > 1) {
      a = _mm256_broadcast_ss(x1 + k);
      c10 = _mm256_fmadd_ps(a, b0, c10);
      c11 = _mm256_fmadd_ps(a, b1, c11);
    }
    if constexpr (MR > 2) {
      a = _mm256_broadcast_ss(x2 + k);
      c20 = _mm256_fmadd_ps(a, b0, c20);
      c21 = _mm256_fmadd_ps(a, b1, c21);
    }
    if constexpr (MR > 3) {
      a = _mm256_broadcast_ss(x3 + k);
      c30 = _mm256_fmadd_ps(a, b0, c30);
      c31 = _mm256_fmadd_ps(a, b1, c31);
    }
    if constexpr (MR > 4) {
      a = _mm256_broadcast_ss(x4 + k);
      c40 = _mm256_fmadd_ps(a, b0, c40);
      c41 = _mm256_fmadd_ps(a, b1, c41);
    }
    if constexpr (MR > 5) {
      a = _mm256_broadcast_ss(x5 + k);
      c50 = _mm256_fmadd_ps(a, b0, c50);
      c51 = _mm256_fmadd_ps(a, b1, c51);
    }
  }
  auto flush = [&](int i, __m256 lo, __m256 hi) {
    float* r = y + i * ldy;
    if (ncols == kPanel) {
      if (first) {
        _mm256_storeu_ps(r, lo);
        _mm256_storeu_ps(r + 8, hi);
      } else {
        _mm256_storeu_ps(r, _mm256_add_ps(_mm256_loadu_ps(r), lo));
        _mm256_storeu_ps(r + 8, _mm256_add_ps(_mm256_loadu_ps(r + 8), hi));
      }
    } else {
      alignas(32) float t[kPanel];
      _mm256_store_ps(t, lo);
      _mm256_store_ps(t + 8, hi);
      for (int64_t j = 0; j < ncols; ++j) r[j] = first ? t[j] : r[j] + t[j];
    }
  };
  flush(0, c00, c01);
  if constexpr (MR > 1) flush(1, c10, c11);
  if constexpr (MR > 2) flush(2, c20, c21);
  if constexpr (MR > 3) flush(3, c30, c31);
  if constexpr (MR > 4) flush(4, c40, c41);
  if constexpr (MR > 5) flush(5, c50, c51);
}
#endif  // MACA_QMM_AVX2

template <int MR>
void micro_scalar(const float* x, int64_t ldx, const float* b, int64_t kc, float* y, int64_t ldy, int64_t ncols,
                  bool first) {
  float c[MR][kPanel] = {};
  for (int64_t k = 0; k < kc; ++k) {
    for (int i = 0; i < MR; ++i) {
      const float a = x[i * ldx + k];
      for (int64_t j = 0; j < kPanel; ++j) c[i][j] += a * b[k * kPanel + j];
    }
  }
  for (int i = 0; i < MR; ++i) {
    float* r = y + i * ldy;
    for (int64_t j = 0; j < ncols; ++j) r[j] = first ? c[i][j] : r[j] + c[i][j];
  }
}

template <int MR>
void micro(const float* x, int64_t ldx, const float* b, int64_t kc, float* y, int64_t ldy, int64_t ncols,
           bool first) {
#if MACA_QMM_AVX2
  micro_avx2<MR>(x, ldx, b, kc, y, ldy, ncols, first);
#else
  micro_scalar<MR>(x, ldx, b, kc, y, ldy, ncols, first);
#endif
}

void micro_dispatch(int mr, const float* x, int64_t ldx, const float* b, int64_t kc, float* y, int64_t ldy,
                    int64_t ncols, bool first) {
  switch (mr) {
    case 1: micro<1>(x, ldx, b, kc, y, ldy, ncols, first); break;
    case 2: micro<2>(x, ldx, b, kc, y, ldy, ncols, first); break;
    case 3: micro<3>(x, ldx, b, kc, y, ldy, ncols, first); break;
    case 4: micro<4>(x, ldx, b, kc, y, ldy, ncols, first); break;
    case 5: micro<5>(x, ldx, b, kc, y, ldy, ncols, first); break;
    default: micro<6>(x, ldx, b, kc, y, ldy, ncols, first); break;
  }
}

void decode_tile(const Problem& p, int64_t cb, int64_t nb, int64_t k0, int64_t kc, const float* tab_s,
                 const float* tab_zs, float* tile) {
#if MACA_QMM_AVX2
  switch (p.bits) {
    case 2: decode_tile_avx2<2>(p, cb, nb, k0, kc, tab_s, tab_zs, tile); return;
    case 3: decode_tile_avx2<3>(p, cb, nb, k0, kc, tab_s, tab_zs, tile); return;
    case 4: decode_tile_avx2<4>(p, cb, nb, k0, kc, tab_s, tab_zs, tile); return;
    case 8: decode_tile_avx2<8>(p, cb, nb, k0, kc, tab_s, tab_zs, tile); return;
    default: break;
  }
#endif
  decode_tile_scalar(p, cb, nb, k0, kc, 0, ceil_div(nb, kPanel) * kPanel, tab_s, tab_zs, tile);
}

// Output columns [n_begin, n_end), all rows.
void tile_path(const Problem& p, int64_t n_begin, int64_t n_end, TileScratch& s) {
  for (int64_t cb = n_begin; cb < n_end; cb += kTileCols) {
    const int64_t nb = std::min(kTileCols, n_end - cb);
    const int64_t panels = ceil_div(nb, kPanel);
    build_tables(p, cb, nb, s.tab_s.get(), s.tab_zs.get());
    for (int64_t m0 = 0; m0 < p.M; m0 += kTileRows) {
      const int64_t m1 = std::min(p.M, m0 + kTileRows);
      for (int64_t k0 = 0; k0 < p.K; k0 += kTileK) {
        const int64_t kc = std::min(kTileK, p.K - k0);
        decode_tile(p, cb, nb, k0, kc, s.tab_s.get(), s.tab_zs.get(), s.tile.get());
        for (int64_t pi = 0; pi < panels; ++pi) {
          const float* panel = s.tile.get() + pi * kc * kPanel;
          const int64_t ncols = std::min(kPanel, nb - pi * kPanel);
          for (int64_t i = m0; i < m1; i += kMR) {
            const int mr = static_cast<int>(std::min<int64_t>(kMR, m1 - i));
            micro_dispatch(mr, p.x + i * p.ldx + k0, p.ldx, panel, kc, p.y + i * p.ldy + cb + pi * kPanel, p.ldy,
                           ncols, k0 == 0);
          }
        }
      }
    }
  }
}

// =============================================================================================
// GEMV path (AVX2 only)
// =============================================================================================
#if MACA_QMM_AVX2
// Zero points of columns n..n+7 (n a multiple of 8) of qzeros row `row`, plus the offset, as floats.
template <int BITS>
MACA_INLINE __m256 zeros8(const int32_t* row, int64_t n, int zero_offset) {
  const char* bytes = reinterpret_cast<const char*>(row) + n * BITS / 8;  // 8 fields = BITS bytes
  __m256i z;
  if constexpr (BITS == 8) {
    int64_t v;
    std::memcpy(&v, bytes, 8);
    z = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(v));
  } else {
    uint32_t v = 0;
    std::memcpy(&v, bytes, BITS);
    const __m256i shifts = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS);
    z = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(v)), shifts),
                         _mm256_set1_epi32((1 << BITS) - 1));
  }
  return _mm256_cvtepi32_ps(_mm256_add_epi32(z, _mm256_set1_epi32(zero_offset)));
}

// Field J of a packing run as code * 2^field_exp(BITS, J): a field that lies inside one word below
// bit 31 is only masked in place (no shift; it converts to float exactly), the activation it multiplies
// is pre-scaled by 2^-field_exp instead. Top-of-word and straddling fields are shifted down (exponent 0).
constexpr int field_exp(int bits, int j) {
  return (j * bits) % 32 + bits < 32 ? (j * bits) % 32 : 0;
}

template <int BITS, int J>
MACA_INLINE __m256i extract_scaled(const __m256i* w) {
  constexpr int bit = J * BITS;
  constexpr int shift = bit % 32;
  if constexpr (shift + BITS < 32) {
    return _mm256_and_si256(w[bit / 32], _mm256_set1_epi32(((1 << BITS) - 1) << shift));
  } else {
    return extract_code<BITS, J>(w);
  }
}

// Accumulator chains per (chunk, row): with few independent accumulators the FMA latency (not the
// throughput) would bound the loop, so small tiles alternate two chains by the parity of J.
template <int MR, int NC>
constexpr int gemv_chains() { return MR * NC >= 4 ? 1 : 2; }

// acc[ch][c][m] += code_J(chunk c) * xk[J * MR + m]. xk holds the pass's x values of this run k-major,
// so every broadcast is one base register plus a constant, and each broadcast feeds NC chunks.
template <int BITS, int MR, int NC, int J>
MACA_INLINE void gemv_step(const __m256i* w, const float* xk, __m256 (&acc)[gemv_chains<MR, NC>()][NC][MR]) {
  constexpr int W = run_words(BITS);
  constexpr int ch = J % gemv_chains<MR, NC>();
  __m256 code[NC];
  for (int c = 0; c < NC; ++c) code[c] = _mm256_cvtepi32_ps(extract_scaled<BITS, J>(w + c * W));
  for (int m = 0; m < MR; ++m) {
    const __m256 xb = _mm256_broadcast_ss(xk + J * MR + m);
    for (int c = 0; c < NC; ++c) acc[ch][c][m] = _mm256_fmadd_ps(code[c], xb, acc[ch][c][m]);
  }
}

template <int BITS, int MR, int NC, int... J>
MACA_INLINE void gemv_run(const __m256i* w, const float* xk, __m256 (&acc)[gemv_chains<MR, NC>()][NC][MR],
                          std::integer_sequence<int, J...>) {
  (gemv_step<BITS, MR, NC, J>(w, xk, acc), ...);
}

// NC chunks of eight columns starting at column j of the block (cb): one run r of every chunk.
// FIRST / LAST: r is the group's first / last run (start the group sums at zero / fold them into y).
template <int BITS, int MR, int NC, bool FIRST, bool LAST>
MACA_INLINE void gemv_chunks(const Problem& p, int64_t m0, int64_t cb, int64_t j, const int32_t* wrow,
                             const float* xk, float* acc, int64_t g, const uint16_t* srow, const int32_t* zrow,
                             const float* xs, const float* unscale) {
  constexpr int P = run_values(BITS);
  constexpr int W = run_words(BITS);
  constexpr int CH = gemv_chains<MR, NC>();
  __m256i w[NC * W];
  for (int c = 0; c < NC; ++c) {
    for (int i = 0; i < W; ++i) {
      w[c * W + i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow + i * p.N + j + 8 * c));
    }
  }
  __m256 a[CH][NC][MR];
  for (int h = 0; h < CH; ++h) {
    for (int c = 0; c < NC; ++c) {
      for (int m = 0; m < MR; ++m) {
        a[h][c][m] = (FIRST || h > 0) ? _mm256_setzero_ps() : _mm256_load_ps(acc + (j + 8 * c) * MR + m * 8);
      }
    }
  }
  gemv_run<BITS, MR, NC>(w, xk, a, std::make_integer_sequence<int, P>{});
  for (int c = 0; c < NC; ++c) {
    for (int m = 0; m < MR; ++m) {
      if constexpr (CH == 2) a[0][c][m] = _mm256_add_ps(a[0][c][m], a[1][c][m]);
    }
    if constexpr (!LAST) {
      for (int m = 0; m < MR; ++m) _mm256_store_ps(acc + (j + 8 * c) * MR + m * 8, a[0][c][m]);
    } else {
      // Fold the group: y += (s * (sum xq*c - z * sum xq)) * 2^-t.
      const int64_t jc = j + 8 * c;
      const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(srow + jc)));
      const __m256 z = zeros8<BITS>(zrow, cb + jc, p.zero_offset);
      for (int m = 0; m < MR; ++m) {
        const __m256 v = _mm256_mul_ps(s, _mm256_fnmadd_ps(z, _mm256_set1_ps(xs[m]), a[0][c][m]));
        float* yp = p.y + (m0 + m) * p.ldy + cb + jc;
        const __m256 u = _mm256_set1_ps(unscale[m]);
        _mm256_storeu_ps(yp, g == 0 ? _mm256_mul_ps(v, u) : _mm256_fmadd_ps(v, u, _mm256_loadu_ps(yp)));
      }
    }
  }
}

// Rows [m0, m0 + MR), columns [n_begin, n_end) with (n_end - n_begin) % 8 == 0.
// acc: scratch of kGemvMR * kGemvCols floats (the running group sums), [column / 8][row][8].
template <int BITS, int MR>
void gemv_rows(const Problem& p, int64_t m0, int64_t n_begin, int64_t n_end, float* acc) {
  constexpr int P = run_values(BITS);
  constexpr int W = run_words(BITS);
  const int64_t N = p.N;
  const float* xq = p.xq + m0 * p.K;  // this pass: [K][MR]
  float unscale[MR];
  for (int m = 0; m < MR; ++m) unscale[m] = p.xq_unscale[m0 + m];
  const int64_t total_runs = p.K / P;
  for (int64_t cb = n_begin; cb < n_end; cb += kGemvCols) {
    const int64_t nb = std::min(kGemvCols, n_end - cb);
    const int64_t nb16 = nb / 16 * 16;
    for (int64_t g = 0; g < p.n_groups; ++g) {
      const int64_t run_begin = g * p.gs / P;
      const int64_t run_end = std::min(total_runs, (g + 1) * p.gs / P);
      const uint16_t* srow = p.sc + g * N + cb;
      const int32_t* zrow = p.qz + g * p.zwords;
      float xs[MR];
      for (int m = 0; m < MR; ++m) xs[m] = p.xsum[(m0 + m) * p.n_groups + g];
      // One packed row (run) over all columns of the block, sixteen columns per step.
      auto sweep = [&](int64_t r, auto first_c, auto last_c) {
        constexpr bool kFirst = decltype(first_c)::value;
        constexpr bool kLast = decltype(last_c)::value;
        const float* xk = xq + r * P * MR;
        const int32_t* wrow = p.qw + r * W * N + cb;
        // Software prefetch of run r + kGemvPrefetchRuns (same columns): each run's block is a separate
        // 4 KB stretch of memory, too short for the hardware prefetchers to ramp up on.
        const int32_t* pf = r + kGemvPrefetchRuns < total_runs ? wrow + kGemvPrefetchRuns * W * N : wrow;
        for (int64_t j = 0; j < nb16; j += 16) {  // two chunks per step: each broadcast feeds both
          if constexpr (kGemvPrefetchRuns > 0) {
            for (int i = 0; i < W; ++i) _mm_prefetch(reinterpret_cast<const char*>(pf + i * N + j), _MM_HINT_T0);
          }
          gemv_chunks<BITS, MR, 2, kFirst, kLast>(p, m0, cb, j, wrow, xk, acc, g, srow, zrow, xs, unscale);
        }
        if (nb16 < nb) {
          gemv_chunks<BITS, MR, 1, kFirst, kLast>(p, m0, cb, nb16, wrow, xk, acc, g, srow, zrow, xs, unscale);
        }
      };
      using T = std::true_type;
      using F = std::false_type;
      if (run_end - run_begin == 1) {
        sweep(run_begin, T{}, T{});
      } else {
        sweep(run_begin, T{}, F{});
        for (int64_t r = run_begin + 1; r + 1 < run_end; ++r) sweep(r, F{}, F{});
        sweep(run_end - 1, F{}, T{});
      }
    }
  }
}

template <int BITS>
void gemv_path_bits(const Problem& p, int64_t n_begin, int64_t n_end, float* acc) {
  static_assert(kGemvMR == 4, "the dispatch below instantiates 1..4 rows per pass (registers allow no more "
                              "with two chunks per step: 2 x 4 accumulators + codes + broadcast)");
  for (int64_t m0 = 0; m0 < p.M; m0 += kGemvMR) {
    switch (std::min<int64_t>(kGemvMR, p.M - m0)) {
      case 1: gemv_rows<BITS, 1>(p, m0, n_begin, n_end, acc); break;
      case 2: gemv_rows<BITS, 2>(p, m0, n_begin, n_end, acc); break;
      case 3: gemv_rows<BITS, 3>(p, m0, n_begin, n_end, acc); break;
      default: gemv_rows<BITS, 4>(p, m0, n_begin, n_end, acc); break;
    }
  }
}

// GEMV inputs per row m: t_m puts max|x[m]| in [1, 2) (t_m clamped to +-100), so that x * 2^(t_m - field_exp)
// (field_exp <= 28) is a normal float, i.e. exact, for every element within 2^-98 of the row's maximum
// (smaller ones cannot matter at fp32 precision); xsum holds the group sums of x * 2^t_m.
void prepare_gemv_x(Problem& p, FloatBuffer& xq, FloatBuffer& unscale, FloatBuffer& xsum) {
  const int P = run_values(p.bits);
  xq = alloc_floats(p.M * p.K);
  unscale = alloc_floats(p.M);
  xsum = alloc_floats(p.M * p.n_groups);
  std::vector<float> factor(P);
  for (int64_t m = 0; m < p.M; ++m) {
    const float* xr = p.x + m * p.ldx;
    float amax = 0.0f;
    for (int64_t k = 0; k < p.K; ++k) amax = std::max(amax, std::fabs(xr[k]));
    int t = 0;
    if (amax > 0.0f && std::isfinite(amax)) t = std::clamp(-std::ilogb(amax), -100, 100);
    unscale[m] = std::ldexp(1.0f, -t);
    for (int j = 0; j < P; ++j) factor[j] = std::ldexp(1.0f, t - field_exp(p.bits, j));  // may be subnormal: exact
    const int64_t m0 = m / kGemvMR * kGemvMR;  // the pass holding row m
    const int64_t rows = std::min<int64_t>(kGemvMR, p.M - m0);
    float* q = xq.get() + m0 * p.K + (m - m0);
    for (int64_t k = 0; k < p.K; k += P) {
      for (int j = 0; j < P; ++j) q[(k + j) * rows] = xr[k + j] * factor[j];
    }
    const float up = std::ldexp(1.0f, t);
    for (int64_t g = 0; g < p.n_groups; ++g) {
      double sum = 0.0;
      for (int64_t k = g * p.gs; k < std::min(p.K, (g + 1) * p.gs); ++k) sum += static_cast<double>(xr[k] * up);
      xsum[m * p.n_groups + g] = static_cast<float>(sum);
    }
  }
  p.xq = xq.get();
  p.xq_unscale = unscale.get();
  p.xsum = xsum.get();
}

void gemv_path(const Problem& p, int64_t n_begin, int64_t n_end, float* acc) {
  switch (p.bits) {
    case 2: gemv_path_bits<2>(p, n_begin, n_end, acc); break;
    case 3: gemv_path_bits<3>(p, n_begin, n_end, acc); break;
    case 4: gemv_path_bits<4>(p, n_begin, n_end, acc); break;
    default: gemv_path_bits<8>(p, n_begin, n_end, acc); break;
  }
}
#endif  // MACA_QMM_AVX2

// ---------------------------------------------------------------------------------------------
// x → fp32 (rows of K, contiguous) for fp16 / bf16 inputs
// ---------------------------------------------------------------------------------------------
void convert_row(float* dst, const void* src, QuantMatmulXType dtype, int64_t n) {
  const uint16_t* s = static_cast<const uint16_t*>(src);
  int64_t i = 0;
  if (dtype == QuantMatmulXType::kFloat16) {
#if MACA_QMM_AVX2
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
#endif
    for (; i < n; ++i) dst[i] = half_to_float(s[i]);
  } else {
    for (; i < n; ++i) dst[i] = bf16_to_float(s[i]);  // a shift: the compiler vectorises it
  }
}

// If g_idx is exactly k / gs for some gs, returns gs; else 0.
int64_t sorted_group_size(const int32_t* g_idx, int64_t K) {
  if (K == 0 || g_idx[0] != 0) return 0;
  int64_t gs = 1;
  while (gs < K && g_idx[gs] == 0) ++gs;
  for (int64_t k = 0; k < K; ++k) {
    if (g_idx[k] != k / gs) return 0;
  }
  return gs;
}

// The weight's fields of a Problem, its groups checked: g_idx entries inside [0, G), or a group size whose
// groups fit G. `fail` throws with the caller's name.
template <typename Fail>
Problem weight_problem(const QuantMatmulArgs& a, Fail fail) {
  if (a.qweight == nullptr || a.qzeros == nullptr || a.scales == nullptr) fail("null qweight, qzeros or scales");
  if (a.G < 1) fail("G must be >= 1");
  if (a.g_idx != nullptr) {
    for (int64_t k = 0; k < a.K; ++k) {
      if (a.g_idx[k] < 0 || a.g_idx[k] >= a.G) fail("g_idx entry outside [0, G)");
    }
  } else {
    if (a.group_size < 1) fail("group_size must be >= 1 without g_idx");
    if (ceil_div(a.K, a.group_size) > a.G) fail("ceil(K / group_size) exceeds G");
  }
  Problem p{};
  p.N = a.N;
  p.K = a.K;
  p.G = a.G;
  p.qw = a.qweight;
  p.qz = a.qzeros;
  p.sc = a.scales;
  p.g_idx = a.g_idx;
  p.gs = a.group_size;
  p.bits = a.bits;
  p.zero_offset = a.zero_offset;
  p.zwords = a.N * a.bits / 32;
  return p;
}

}  // namespace

void quant_matmul(const QuantMatmulArgs& a) {
  auto fail = [](const char* what) { throw std::invalid_argument(std::string("quant_matmul: ") + what); };
  if (a.M < 0 || a.N < 0 || a.K < 0 || a.G < 0) fail("negative size");
  if (a.bits != 2 && a.bits != 3 && a.bits != 4 && a.bits != 8) fail("bits must be 2, 3, 4 or 8");
  if (a.M == 0 || a.N == 0) return;
  if (a.y == nullptr || a.ldy < a.N) fail("y is null or ldy < N");
  const int P = run_values(a.bits);
  if (a.K % P != 0) fail("K must be a multiple of the packing run (32/bits values, 32 for 3-bit)");
  if ((a.N * a.bits) % 32 != 0) fail("N * bits must be a multiple of 32 (qzeros packs N along whole words)");
  if (a.K == 0) {
    for (int64_t m = 0; m < a.M; ++m) std::fill(a.y + m * a.ldy, a.y + m * a.ldy + a.N, 0.0f);
    return;
  }
  if (a.x == nullptr || a.ldx < a.K) fail("x is null or ldx < K");
  if (a.x_dtype != QuantMatmulXType::kFloat32 && a.x_dtype != QuantMatmulXType::kFloat16 &&
      a.x_dtype != QuantMatmulXType::kBFloat16)
    fail("bad x dtype code");

  Problem p = weight_problem(a, fail);
  p.y = a.y;
  p.ldy = a.ldy;
  p.M = a.M;
  if (a.g_idx != nullptr) {  // an identity-like g_idx (k / gs) takes the sorted-group paths
    p.gs = sorted_group_size(a.g_idx, a.K);
    p.g_idx = p.gs > 0 ? nullptr : a.g_idx;
  }
  p.n_groups = p.g_idx ? 0 : ceil_div(a.K, p.gs);

  bool use_gemv = false;
#if MACA_QMM_AVX2
  use_gemv = a.M <= kGemvMaxM && p.g_idx == nullptr && p.gs % P == 0;
#endif

  // Chunks of whole panels, so the panel/16-column grouping of every column (and so its arithmetic) does
  // not depend on the thread count; only the last chunk has a ragged end, as the last range had before.
  const int requested = a.num_threads > 0 ? a.num_threads : default_num_threads();
  int64_t chunk_cols = kTileChunkCols;
  if (use_gemv) {
    chunk_cols = requested <= 1 ? ceil_div(a.N, kPanel) * kPanel
                                : std::clamp(ceil_div(a.N, 4 * int64_t(requested) * kPanel) * kPanel, kGemvMinChunk,
                                             kGemvMaxChunk);
  }
  const int64_t n_chunks = ceil_div(a.N, chunk_cols);
  const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(requested, n_chunks)));

  // x as fp32 rows. Small x (every GEMV) is converted on this thread: a parallel region would cost more
  // than the conversion.
  FloatBuffer xbuf;
  if (a.x_dtype == QuantMatmulXType::kFloat32) {
    p.x = static_cast<const float*>(a.x);
    p.ldx = a.ldx;
  } else {
    xbuf = alloc_floats(a.M * a.K);
    const size_t esize = 2;
    const char* base = static_cast<const char*>(a.x);
    auto convert_rows = [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        convert_row(xbuf.get() + m * a.K, base + static_cast<size_t>(m * a.ldx) * esize, a.x_dtype, a.K);
      }
    };
    constexpr int64_t kSerialConvert = int64_t(1) << 20;  // elements
    if (a.M * a.K < kSerialConvert || nthreads == 1) {
      convert_rows(0, a.M);
    } else {
      const int64_t rows = std::max<int64_t>(1, (int64_t(1) << 16) / a.K);
      parallel_chunks(ceil_div(a.M, rows), nthreads,
                      [&](int64_t c, int) { convert_rows(c * rows, std::min(a.M, (c + 1) * rows)); });
    }
    p.x = xbuf.get();
    p.ldx = a.K;
  }

  FloatBuffer xq, xq_unscale, xsum;
#if MACA_QMM_AVX2
  if (use_gemv) prepare_gemv_x(p, xq, xq_unscale, xsum);
#endif

  // Per-thread scratch, allocated here so that no chunk can throw.
  std::vector<TileScratch> tiles(nthreads);
  std::vector<FloatBuffer> gemv_acc(nthreads);
  for (int t = 0; t < nthreads; ++t) {
    if (use_gemv) gemv_acc[t] = alloc_floats(kGemvMR * kGemvCols);
    // The GEMV path needs the tile path only for a tail of < 8 columns (8-bit, N % 8 == 4).
    if (!use_gemv || a.N % 8 != 0) {
      tiles[t].tab_s = alloc_floats(a.G * kTileCols);
      tiles[t].tab_zs = alloc_floats(a.G * kTileCols);
      tiles[t].tile = alloc_floats(kTileK * kTileCols);
    }
  }

  parallel_chunks(n_chunks, nthreads, [&](int64_t c, int slot) {
    const int64_t n_begin = c * chunk_cols;
    const int64_t n_end = std::min(a.N, n_begin + chunk_cols);
#if MACA_QMM_AVX2
    if (use_gemv) {
      const int64_t n_vec = n_begin + (n_end - n_begin) / 8 * 8;
      if (n_vec > n_begin) gemv_path(p, n_begin, n_vec, gemv_acc[slot].get());
      if (n_vec < n_end) tile_path(p, n_vec, n_end, tiles[slot]);
      return;
    }
#endif
    tile_path(p, n_begin, n_end, tiles[slot]);
  });
}

void quant_dequantize(const QuantMatmulArgs& a, float* wt) {
  auto fail = [](const char* what) { throw std::invalid_argument(std::string("quant_dequantize: ") + what); };
  if (a.bits != 2 && a.bits != 3 && a.bits != 4 && a.bits != 8) fail("bits must be 2, 3, 4 or 8");
  if (a.N < 0 || a.K < 0 || (a.N * a.bits) % 32 != 0 || (a.K * a.bits) % 32 != 0) fail("bad N or K for the packing");
  if (a.N == 0 || a.K == 0) return;
  if (wt == nullptr) fail("wt is null");
  const Problem p = weight_problem(a, fail);
  constexpr int64_t kCols = 256;  // columns per chunk: a chunk's zeros and scales of every group stay in cache
  const int64_t n_chunks = ceil_div(a.N, kCols);
  const int requested = a.num_threads > 0 ? a.num_threads : default_num_threads();
  const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(requested, n_chunks)));
  std::vector<FloatBuffer> zeros(nthreads), scales(nthreads);
  for (int t = 0; t < nthreads; ++t) {
    zeros[t] = alloc_floats(a.G * kCols);
    scales[t] = alloc_floats(a.G * kCols);
  }
  parallel_chunks(n_chunks, nthreads, [&](int64_t c, int slot) {
    const int64_t n0 = c * kCols, n1 = std::min(a.N, n0 + kCols), w = n1 - n0;
    float* z = zeros[slot].get();
    float* s = scales[slot].get();
    for (int64_t g = 0; g < a.G; ++g) {
      for (int64_t n = n0; n < n1; ++n) {
        z[g * kCols + n - n0] = p.zero(g, n);
        s[g * kCols + n - n0] = half_to_float(a.scales[g * a.N + n]);
      }
    }
    const uint32_t mask = (1u << a.bits) - 1u;
    for (int64_t k = 0; k < a.K; ++k) {
      const int64_t g = p.group_of(k);
      const float* zg = z + g * kCols;
      const float* sg = s + g * kCols;
      float* out = wt + k * a.N + n0;
      if (a.bits == 3) {
        for (int64_t j = 0; j < w; ++j) {
          out[j] = (static_cast<float>(stream_field(a.qweight + n0 + j, a.N, k, 3)) - zg[j]) * sg[j];
        }
      } else {
        const int per = 32 / a.bits;
        const int shift = static_cast<int>(k % per) * a.bits;
        const int32_t* row = a.qweight + (k / per) * a.N + n0;
        for (int64_t j = 0; j < w; ++j) {
          out[j] = (static_cast<float>((static_cast<uint32_t>(row[j]) >> shift) & mask) - zg[j]) * sg[j];
        }
      }
    }
  });
}

std::string quant_matmul_build_info() {
#if MACA_QMM_AVX2
  return "avx2+fma f16c openmp";
#else
  return "portable openmp";
#endif
}

}  // namespace maca
