// Weighted Gram matrix  out += sum_r w_r * A_r^T B_r  (see weighted_gram.h).
//
// GotoBLAS-style design, specialised for the shape of calibration data (K = tokens is huge,
// M = N = d is moderate) and for the per-run weights:
//   * tokens are processed in K-blocks of kKC rows; each K-block of A and B is packed (and converted
//     from fp16/bf16 to fp32) into kMR-wide panels for A and kNR-wide panels for B, zero-padded at the
//     edges so any d works without edge cases in the hot loop;
//   * a kMR x kNR register tile accumulates over consecutive tokens of equal weight (a "segment") and
//     is flushed as C += w * acc when the weight changes or the K-block ends, so the weight multiplies
//     fp32 partial sums, never the inputs;
//   * C lives in an fp32 scratch buffer that is added to `out` at the end; for B = A only the tiles
//     touching the upper triangle are computed and the mirror is added explicitly, because `out` need
//     not be symmetric on entry;
//   * the work is split into units, "pack a share of K-block p" and "compute K-block p for column range
//     c", run by whichever threads are running (common/parallel.h); each unit is taken as soon as it is
//     ready, from a ring of packed K-blocks, so a preempted thread does not stall the others (see
//     "Work split").
#include "weighted_gram.h"

#include "common/float_buffer.h"
#include "common/fp16.h"
#include "common/parallel.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MACA_GRAM_AVX2 1
#else
#define MACA_GRAM_AVX2 0
#endif

#if MACA_GRAM_AVX2 && defined(__F16C__)
#define MACA_GRAM_F16C 1
#else
#define MACA_GRAM_F16C 0
#endif

namespace maca {
namespace {

// ---------------------------------------------------------------------------------------------
// Blocking parameters, sized for AVX2 (16 ymm registers) and a 32 KB L1d / 512 KB+ L2 per core.
// ---------------------------------------------------------------------------------------------
constexpr int kMR = 6;    // rows of the register tile (broadcast side)
constexpr int kNR = 16;   // columns of the register tile (two ymm vectors)
constexpr int kKC = 256;  // tokens per K-block: a B panel (16 KB) + an A panel (6 KB) fit in L1
constexpr int kRowGroupPanels = 32;  // A panels reused from L2: 192 rows x kKC x 4 B = 192 KB
constexpr int64_t kDefaultScratchBudget = int64_t(256) << 20;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

// Per-dtype storage type and converters. vec8 is the AVX2 path for 8 elements.
template <InputDType DT>
struct Elem;

template <>
struct Elem<InputDType::kFloat32> {
  using T = float;
  static constexpr bool kVec = MACA_GRAM_AVX2;
  static float one(T v) { return v; }
#if MACA_GRAM_AVX2
  static __m256 vec8(const T* p) { return _mm256_loadu_ps(p); }
#endif
};

template <>
struct Elem<InputDType::kFloat16> {
  using T = uint16_t;
  static constexpr bool kVec = MACA_GRAM_F16C;
  static float one(T v) { return half_to_float(v); }
#if MACA_GRAM_F16C
  static __m256 vec8(const T* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
#endif
};

template <>
struct Elem<InputDType::kBFloat16> {
  using T = uint16_t;
  static constexpr bool kVec = MACA_GRAM_AVX2;
  static float one(T v) { return bf16_to_float(v); }
#if MACA_GRAM_AVX2
  static __m256 vec8(const T* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
#endif
};

// dst[0:n] = float(src[0:n]) - float(sub[0:n])   (sub may be null)
template <InputDType DT>
void convert_row_typed(float* dst, const void* src_v, const void* sub_v, int64_t n) {
  using E = Elem<DT>;
  const auto* src = static_cast<const typename E::T*>(src_v);
  const auto* sub = static_cast<const typename E::T*>(sub_v);
  int64_t i = 0;
#if MACA_GRAM_AVX2
  if constexpr (E::kVec) {
    if (sub == nullptr) {
      for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, E::vec8(src + i));
    } else {
      for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_sub_ps(E::vec8(src + i), E::vec8(sub + i)));
    }
  }
#endif
  for (; i < n; ++i) dst[i] = sub == nullptr ? E::one(src[i]) : E::one(src[i]) - E::one(sub[i]);
}

// Converts n elements starting at element `offset` of row `row` of a strided matrix.
void convert_row(float* dst, const void* base, const void* sub_base, InputDType dtype, int64_t row,
                 int64_t row_stride, int64_t offset, int64_t n) {
  const int64_t first = row * row_stride + offset;  // int64: row * stride may exceed 2^31
  switch (dtype) {
    case InputDType::kFloat32: {
      const float* s = sub_base ? static_cast<const float*>(sub_base) + first : nullptr;
      convert_row_typed<InputDType::kFloat32>(dst, static_cast<const float*>(base) + first, s, n);
      break;
    }
    case InputDType::kFloat16:
    case InputDType::kBFloat16: {
      const uint16_t* s = sub_base ? static_cast<const uint16_t*>(sub_base) + first : nullptr;
      const uint16_t* x = static_cast<const uint16_t*>(base) + first;
      if (dtype == InputDType::kFloat16) {
        convert_row_typed<InputDType::kFloat16>(dst, x, s, n);
      } else {
        convert_row_typed<InputDType::kBFloat16>(dst, x, s, n);
      }
      break;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Schedule: runs cut into K-blocks of at most kKC tokens.
// ---------------------------------------------------------------------------------------------
struct Piece {      // rows [row, row + len) land on K-block positions [pos, pos + len)
  int64_t row;
  int32_t pos;
  int32_t len;
};

struct Segment {    // K-block positions [begin, end) share one weight
  int32_t begin;
  int32_t end;
  float weight;
};

struct KBlock {
  int32_t kc;       // tokens in this block (<= kKC)
  int64_t piece_begin, piece_end;
  int64_t seg_begin, seg_end;
};

struct Schedule {
  std::vector<Piece> pieces;
  std::vector<Segment> segments;
  std::vector<KBlock> blocks;
};

Schedule build_schedule(const WeightedGramArgs& args) {
  Schedule s;
  KBlock cur{0, 0, 0, 0, 0};
  auto close_block = [&] {
    cur.piece_end = static_cast<int64_t>(s.pieces.size());
    cur.seg_end = static_cast<int64_t>(s.segments.size());
    s.blocks.push_back(cur);
    cur = KBlock{0, cur.piece_end, cur.piece_end, cur.seg_end, cur.seg_end};
  };
  for (int64_t r = 0; r < args.n_runs; ++r) {
    int64_t row = args.run_start[r];
    int64_t remaining = args.run_len[r];
    const float w = args.run_weight[r];
    if (row < 0 || remaining < 1) throw std::invalid_argument("weighted_gram: run_start < 0 or run_len < 1");
    while (remaining > 0) {
      if (cur.kc == kKC) close_block();
      const int32_t take = static_cast<int32_t>(std::min<int64_t>(remaining, kKC - cur.kc));
      s.pieces.push_back({row, cur.kc, take});
      // Consecutive tokens of equal weight share one register accumulation.
      const bool extend = static_cast<int64_t>(s.segments.size()) > cur.seg_begin && s.segments.back().weight == w;
      if (extend) {
        s.segments.back().end += take;
      } else {
        s.segments.push_back({cur.kc, cur.kc + take, w});
      }
      cur.kc += take;
      row += take;
      remaining -= take;
    }
  }
  if (cur.kc > 0) close_block();
  return s;
}

// ---------------------------------------------------------------------------------------------
// Micro-kernel: C[0:kMR, 0:kNR] += sum_s w_s * sum_{t in s} A[t, 0:kMR]^T B[t, 0:kNR]
// A: packed panel [kKC][kMR]; B: packed panel [kKC][kNR] (32-byte aligned); C: 32-byte aligned rows.
// With `overwrite` the first segment stores instead of adding: the scratch needs no zeroing pass.
// ---------------------------------------------------------------------------------------------
#if MACA_GRAM_AVX2
inline void micro_kernel(const float* A, const float* B, const Segment* seg, const Segment* seg_end, float* C,
                         int64_t ldc, bool overwrite) {
  // The C tile is needed only at the first flush: start fetching it now (one 64-byte line per row).
  for (int r = 0; r < kMR; ++r) _mm_prefetch(reinterpret_cast<const char*>(C + r * ldc), _MM_HINT_T0);
  for (; seg != seg_end; ++seg) {
    __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
    __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
    __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
    __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
    __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
    __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
    const float* a = A + static_cast<int64_t>(seg->begin) * kMR;
    const float* b = B + static_cast<int64_t>(seg->begin) * kNR;
    const int32_t n = seg->end - seg->begin;  // a local bound: no reload of seg->end per token
#pragma GCC unroll 4
    for (int32_t k = 0; k < n; ++k, a += kMR, b += kNR) {
      const __m256 b0 = _mm256_load_ps(b);
      const __m256 b1 = _mm256_load_ps(b + 8);
      __m256 x = _mm256_broadcast_ss(a + 0);
      c00 = _mm256_fmadd_ps(x, b0, c00);
      c01 = _mm256_fmadd_ps(x, b1, c01);
      x = _mm256_broadcast_ss(a + 1);
      c10 = _mm256_fmadd_ps(x, b0, c10);
      c11 = _mm256_fmadd_ps(x, b1, c11);
      x = _mm256_broadcast_ss(a + 2);
      c20 = _mm256_fmadd_ps(x, b0, c20);
      c21 = _mm256_fmadd_ps(x, b1, c21);
      x = _mm256_broadcast_ss(a + 3);
      c30 = _mm256_fmadd_ps(x, b0, c30);
      c31 = _mm256_fmadd_ps(x, b1, c31);
      x = _mm256_broadcast_ss(a + 4);
      c40 = _mm256_fmadd_ps(x, b0, c40);
      c41 = _mm256_fmadd_ps(x, b1, c41);
      x = _mm256_broadcast_ss(a + 5);
      c50 = _mm256_fmadd_ps(x, b0, c50);
      c51 = _mm256_fmadd_ps(x, b1, c51);
    }
    // Flush: the weight scales the fp32 partial sums of this segment.
    const __m256 w = _mm256_set1_ps(seg->weight);
    auto flush_row = [&](float* row, __m256 lo, __m256 hi) {
      if (overwrite) {
        _mm256_store_ps(row, _mm256_mul_ps(w, lo));
        _mm256_store_ps(row + 8, _mm256_mul_ps(w, hi));
      } else {
        _mm256_store_ps(row, _mm256_fmadd_ps(w, lo, _mm256_load_ps(row)));
        _mm256_store_ps(row + 8, _mm256_fmadd_ps(w, hi, _mm256_load_ps(row + 8)));
      }
    };
    flush_row(C + 0 * ldc, c00, c01);
    flush_row(C + 1 * ldc, c10, c11);
    flush_row(C + 2 * ldc, c20, c21);
    flush_row(C + 3 * ldc, c30, c31);
    flush_row(C + 4 * ldc, c40, c41);
    flush_row(C + 5 * ldc, c50, c51);
    overwrite = false;
  }
}
#elif defined(__GNUC__)
// Portable fallback with GCC/Clang 128-bit vector extensions (SSE on baseline x86-64, NEON on arm64);
// same arithmetic: fp32 products and sums, the weight applied to partial sums. The 16 columns are
// done as two halves of 8 so that the 12 accumulators fit in 16 vector registers.
typedef float vec4 __attribute__((vector_size(16)));

inline vec4 load4(const float* p) {
  vec4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void micro_kernel(const float* A, const float* B, const Segment* seg, const Segment* seg_end, float* C,
                         int64_t ldc, bool overwrite) {
  for (; seg != seg_end; ++seg) {
    for (int half = 0; half < 2; ++half) {
      vec4 acc[kMR][2] = {};
      for (int32_t t = seg->begin; t < seg->end; ++t) {
        const float* a = A + static_cast<int64_t>(t) * kMR;
        const float* b = B + static_cast<int64_t>(t) * kNR + 8 * half;
        const vec4 b0 = load4(b), b1 = load4(b + 4);
        for (int r = 0; r < kMR; ++r) {
          const vec4 x = {a[r], a[r], a[r], a[r]};
          acc[r][0] += x * b0;
          acc[r][1] += x * b1;
        }
      }
      const vec4 w = {seg->weight, seg->weight, seg->weight, seg->weight};
      for (int r = 0; r < kMR; ++r) {
        for (int q = 0; q < 2; ++q) {
          float* c = C + r * ldc + 8 * half + 4 * q;
          const vec4 sum = (overwrite ? vec4{} : load4(c)) + w * acc[r][q];
          std::memcpy(c, &sum, sizeof sum);
        }
      }
    }
    overwrite = false;
  }
}
#else
// Plain scalar fallback for other compilers.
inline void micro_kernel(const float* A, const float* B, const Segment* seg, const Segment* seg_end, float* C,
                         int64_t ldc, bool overwrite) {
  for (; seg != seg_end; ++seg) {
    float acc[kMR][kNR] = {};
    for (int32_t t = seg->begin; t < seg->end; ++t) {
      const float* a = A + static_cast<int64_t>(t) * kMR;
      const float* b = B + static_cast<int64_t>(t) * kNR;
      for (int r = 0; r < kMR; ++r)
        for (int j = 0; j < kNR; ++j) acc[r][j] += a[r] * b[j];
    }
    for (int r = 0; r < kMR; ++r)
      for (int j = 0; j < kNR; ++j) C[r * ldc + j] = (overwrite ? 0.0f : C[r * ldc + j]) + seg->weight * acc[r][j];
    overwrite = false;
  }
}
#endif

// ---------------------------------------------------------------------------------------------
// Column stripes: C is computed in stripes of columns [c0, c1) so the scratch stays within budget
// (one stripe unless d is very large). For B = A a stripe needs rows [0, c1) only (upper triangle).
// ---------------------------------------------------------------------------------------------
struct Stripe {
  int64_t c0, c1;
  int64_t a_panels;  // kMR-row panels of A covering the rows this stripe needs
  int64_t b_panels;  // kNR-column panels of B covering [c0, c1)
  int64_t lds;       // leading dimension of the scratch
};

Stripe make_stripe(int64_t d, bool symmetric, int64_t c0, int64_t c1) {
  Stripe s{c0, c1, ceil_div(symmetric ? c1 : d, kMR), ceil_div(c1 - c0, kNR), 0};
  s.lds = s.b_panels * kNR;
  if (s.lds % 256 == 0) s.lds += kNR;  // rows 4 KiB apart would alias in L1 during C tile flushes
  return s;
}

// Number of A panels whose tiles touch the upper triangle in B panel jr of the stripe.
int64_t a_panel_limit(const Stripe& s, bool symmetric, int64_t jr) {
  if (!symmetric) return s.a_panels;
  return std::min(s.a_panels, ceil_div(s.c0 + (jr + 1) * kNR, kMR));
}

// Widest multiple of kNR columns whose scratch (rows x width) fits the budget (at least kNR).
int64_t stripe_width(int64_t d, int64_t budget) {
  const int64_t rows = round_up(d, kMR);
  const int64_t full = round_up(d, kNR);
  if (rows * (full + kNR) * int64_t(sizeof(float)) <= budget) return full;
  const int64_t w = (budget / (rows * int64_t(sizeof(float))) - kNR) / kNR * kNR;
  return std::max<int64_t>(kNR, w);
}

// ---------------------------------------------------------------------------------------------
// Work split. C columns are cut into n_compute "chains" (ranges of B panels with equal triangular work)
// and each K-block's tokens into n_pack shares. The units of a stripe are pack(p, share), compute(p, c)
// and add_out(c). A chain computes its K-blocks strictly in order (each C element sums its K-blocks in
// the same order with the same micro-kernel, so the result does not depend on the thread count or on
// who ran what); different chains are independent. Packed K-blocks live in a ring: pack(p, *) needs
// every chain past block p - ring, compute(p, c) needs every share of block p.
//
// Units are not claimed in a fixed order: each chunk of the pool (common/parallel.h) takes whichever
// unit is ready (see StripeJob::pick), so when a thread is preempted in the middle of chain c the
// others go on with the other chains, up to ring - 1 K-blocks past c, instead of waiting at c's next
// block. A chunk waits only while no unit is ready, which means another thread is running one (if no
// unit were running, the least advanced chain's block or its missing pack would be ready); it then
// blocks after a short spin, which frees the core for that thread. One thread: pack(p) compute(p)
// with a single ring slot, exactly the serial loop.
// ---------------------------------------------------------------------------------------------
struct PanelRange {
  int64_t jr0, jr1;  // B panels [jr0, jr1) of the stripe
};

PanelRange owned_panels(const Stripe& s, bool symmetric, int64_t tid, int64_t nth) {
  int64_t total = 0;
  for (int64_t jr = 0; jr < s.b_panels; ++jr) total += a_panel_limit(s, symmetric, jr);
  // Range t holds the panels whose cumulative work ends in (total*t/nth, total*(t+1)/nth].
  const int64_t lo = total * tid / nth, hi = total * (tid + 1) / nth;
  PanelRange r{s.b_panels, s.b_panels};
  int64_t before = 0;
  for (int64_t jr = 0; jr < s.b_panels; ++jr) {
    const int64_t after = before + a_panel_limit(s, symmetric, jr);
    const int64_t mid = before + (after - before) / 2;  // a panel goes to whoever holds its midpoint
    if (mid >= lo && r.jr0 == s.b_panels) r.jr0 = jr;
    if (mid >= hi) { r.jr1 = jr; break; }
    before = after;
  }
  if (r.jr0 > r.jr1) r.jr0 = r.jr1;
  if (tid == nth - 1) r.jr1 = s.b_panels;
  return r;
}

// ---------------------------------------------------------------------------------------------
// Shared state of one call.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kAPanelStride = kKC * kMR + 16;  // +64 bytes: successive panels fall in different
constexpr int64_t kBPanelStride = kKC * kNR + 16;  // L1 sets while packing (no 4 KiB aliasing)
constexpr int kComputeChunksPerThread = 2;  // chains per thread (more: finer balance, more A traffic)

struct Slot {  // one entry of the ring of packed K-blocks
  FloatBuffer a, b;
};

struct Context {
  const WeightedGramArgs& args;
  const Schedule& sched;
  bool symmetric;
  int64_t row_len;  // padded length of a converted row in the conversion buffers
  std::vector<Slot>& ring;
  float* scratch;   // [a_panels * kMR][lds] of the current stripe
};

// Columns of A and of B that a stripe's panels read (clipped to d; the panel tails stay zero).
int64_t a_cols(const Stripe& s, int64_t d) { return std::min(d, s.a_panels * kMR); }
int64_t b_cols(const Stripe& s, int64_t d) { return std::min(d, s.c0 + s.b_panels * kNR) - s.c0; }

// Converts up to kPackGroup token rows and scatters them into the A and B panels of one slot at
// K-block positions t0 .. t0 + n - 1. Grouping tokens makes each panel receive a contiguous run of
// n rows (whole cache lines) instead of one small store per token.
constexpr int kPackGroup = 8;

void pack_rows(const Context& ctx, const Stripe& s, const Slot& slot, const int64_t* rows, int32_t t0, int n,
               float* buf_a, float* buf_b) {
  const WeightedGramArgs& g = ctx.args;
  const int64_t na = a_cols(s, g.d), nb = b_cols(s, g.d);
  if (ctx.symmetric) buf_b = buf_a;  // one converted row feeds both packs
  for (int k = 0; k < n; ++k) {
    float* ra = buf_a + k * ctx.row_len;
    if (ctx.symmetric) {
      convert_row(ra, g.a, nullptr, g.dtype, rows[k], g.row_stride, 0, std::max(na, s.c0 + nb));
    } else {
      convert_row(ra, g.a, g.a_sub, g.dtype, rows[k], g.row_stride, 0, na);
      convert_row(buf_b + k * ctx.row_len + s.c0, g.b, nullptr, g.dtype, rows[k], g.row_stride, s.c0, nb);
    }
  }
  for (int64_t p = 0; p < s.a_panels; ++p) {
    float* dst = slot.a.get() + p * kAPanelStride + int64_t(t0) * kMR;
    for (int k = 0; k < n; ++k) std::memcpy(dst + k * kMR, buf_a + k * ctx.row_len + p * kMR, kMR * sizeof(float));
  }
  for (int64_t q = 0; q < s.b_panels; ++q) {
    float* dst = slot.b.get() + q * kBPanelStride + int64_t(t0) * kNR;
    const float* src = buf_b + s.c0 + q * kNR;
    for (int k = 0; k < n; ++k) std::memcpy(dst + k * kNR, src + k * ctx.row_len, kNR * sizeof(float));
  }
}

// Asks for the part of a source row that the next K-block will pack, so that the DRAM reads overlap
// with this block's computation instead of stalling the next packing.
void prefetch_row(const Context& ctx, const Stripe& s, int64_t row) {
  const WeightedGramArgs& g = ctx.args;
  const int64_t elem = g.dtype == InputDType::kFloat32 ? 4 : 2;
  auto span = [&](const void* base, int64_t first, int64_t n) {
    const char* p = static_cast<const char*>(base) + (row * g.row_stride + first) * elem;
    for (int64_t off = 0; off < n * elem; off += 64) __builtin_prefetch(p + off, 0, 2);
  };
  const int64_t na = a_cols(s, g.d), nb = b_cols(s, g.d);
  if (ctx.symmetric) {
    span(g.a, 0, std::max(na, s.c0 + nb));
    return;
  }
  span(g.a, 0, na);
  if (g.a_sub != nullptr) span(g.a_sub, 0, na);
  span(g.b, s.c0, nb);
}

// The source rows of one share (an equal slice of positions) of a K-block, in order.
class ShareRows {
 public:
  ShareRows(const Schedule& sched, const KBlock& kb, int tid, int nth)
      : piece_(sched.pieces.data() + kb.piece_begin),
        pos_(static_cast<int32_t>(int64_t(kb.kc) * tid / nth)),
        end_(static_cast<int32_t>(int64_t(kb.kc) * (tid + 1) / nth)) {}
  ShareRows() = default;  // empty

  int32_t position() const { return pos_; }

  bool next(int64_t& row) {
    if (pos_ >= end_) return false;
    while (piece_->pos + piece_->len <= pos_) ++piece_;  // pieces tile [0, kc) in order
    row = piece_->row + (pos_ - piece_->pos);
    ++pos_;
    return true;
  }

 private:
  const Piece* piece_ = nullptr;
  int32_t pos_ = 0, end_ = 0;
};

// Packs one share of a K-block into slot, prefetching the same share of the next K-block.
void pack_share(const Context& ctx, const Stripe& s, ShareRows share, ShareRows next_share, const Slot& slot,
                float* buf_a, float* buf_b) {
  int64_t rows[kPackGroup];
  int n = 0;
  int32_t group_start = share.position();
  int64_t row = 0, ahead = 0;
  while (share.next(row)) {
    if (next_share.next(ahead)) prefetch_row(ctx, s, ahead);
    rows[n++] = row;
    if (n == kPackGroup) {
      pack_rows(ctx, s, slot, rows, group_start, n, buf_a, buf_b);
      group_start += n;
      n = 0;
    }
  }
  if (n > 0) pack_rows(ctx, s, slot, rows, group_start, n, buf_a, buf_b);
}

// All micro-kernel calls of K-block kb that fall in the B panels `own`. Row groups outermost:
// a block of kRowGroupPanels A panels stays in L2 while the owned B panels stream past it.
void compute_share(const Context& ctx, const Stripe& s, const KBlock& kb, const Slot& slot, PanelRange own,
                   bool first_block) {
  const Segment* seg0 = ctx.sched.segments.data() + kb.seg_begin;
  const Segment* seg1 = ctx.sched.segments.data() + kb.seg_end;
  for (int64_t ig = 0; ig < s.a_panels; ig += kRowGroupPanels) {
    const int64_t ig1 = std::min(ig + kRowGroupPanels, s.a_panels);
    for (int64_t jr = own.jr0; jr < own.jr1; ++jr) {
      const float* B = slot.b.get() + jr * kBPanelStride;
      float* C = ctx.scratch + jr * kNR;
      const int64_t ir1 = std::min(ig1, a_panel_limit(s, ctx.symmetric, jr));
      for (int64_t ir = ig; ir < ir1; ++ir)
        micro_kernel(slot.a.get() + ir * kAPanelStride, B, seg0, seg1, C + ir * kMR * s.lds, s.lds, first_block);
    }
  }
}

// out[i, j] += G[j, i] for i in [i_begin, i_end) and every j < i, where G[j, i] = S[j * lds + i].
// Works in kT x kT tiles through a small transposed buffer: destination rows are often a multiple of
// 4 KiB apart (ld_out = d), and writing one element per row per step would thrash the L1 sets.
void add_mirror(const WeightedGramArgs& g, const float* S, int64_t lds, int64_t i_begin, int64_t i_end) {
  constexpr int64_t kT = 16;
  float tile[kT][kT];
  for (int64_t i0 = i_begin; i0 < i_end; i0 += kT) {
    const int64_t ni = std::min(kT, i_end - i0);
    const int64_t j_end = i0 + ni - 1;  // j < i <= i0 + ni - 1
    for (int64_t jb = 0; jb < j_end; jb += kT) {
      const int64_t nj = std::min(kT, j_end - jb);
      for (int64_t a = 0; a < nj; ++a) {  // source row jb + a, only the entries with j < i
        const float* src = S + (jb + a) * lds;
        for (int64_t b = std::max<int64_t>(0, jb + a + 1 - i0); b < ni; ++b) tile[b][a] = src[i0 + b];
      }
      for (int64_t b = 0; b < ni; ++b) {
        float* o = g.out + (i0 + b) * g.ld_out + jb;
        const int64_t n = std::min(nj, i0 + b - jb);
        for (int64_t a = 0; a < n; ++a) o[a] += tile[b][a];
      }
    }
  }
}

// out += scratch for the owned columns [j0, j1). For B = A the scratch holds G[i, j] for i <= j: it
// is added to out[i, j] and, mirrored, to out[j, i] for i < j (rows [j0, j1) of out). The owners'
// destinations are disjoint, and each reads only the scratch columns it computed itself.
void add_share_to_out(const Context& ctx, const Stripe& s, PanelRange own) {
  const WeightedGramArgs& g = ctx.args;
  const int64_t j0 = s.c0 + own.jr0 * kNR, j1 = std::min(s.c1, s.c0 + own.jr1 * kNR);
  if (j0 >= j1) return;
  const float* S = ctx.scratch - s.c0;  // S[i * lds + j] = G[i, j] for j in the stripe
  const int64_t rows = ctx.symmetric ? j1 : g.d;
  for (int64_t i = 0; i < rows; ++i) {
    float* o = g.out + i * g.ld_out;
    const float* src = S + i * s.lds;
    for (int64_t j = ctx.symmetric ? std::max(j0, i) : j0; j < j1; ++j) o[j] += src[j];
  }
  if (ctx.symmetric) add_mirror(g, S, s.lds, j0, j1);
}

// Units of one stripe and the scheduler that hands them out (see "Work split"). Every chunk of the pool
// runs exactly one unit, so a stripe is units() chunks.
class StripeJob {
 public:
  StripeJob(const Context& c, const Stripe& st, int threads, int64_t ring)
      : ctx_(c),
        s_(st),
        n_pack_(threads),
        n_compute_(threads > 1 ? std::min<int64_t>(st.b_panels, int64_t(kComputeChunksPerThread) * threads) : 1),
        n_blocks_(static_cast<int64_t>(c.sched.blocks.size())),
        ring_(ring) {
    for (int64_t i = 0; i < n_compute_; ++i) ranges_.push_back(owned_panels(s_, ctx_.symmetric, i, n_compute_));
    packed_.assign(static_cast<size_t>(ring_), 0);
    consumed_.assign(static_cast<size_t>(ring_), 0);
    pos_.assign(static_cast<size_t>(n_compute_), 0);
    busy_.assign(static_cast<size_t>(n_compute_), 0);
  }

  int64_t units() const { return n_blocks_ * (n_pack_ + n_compute_) + n_compute_; }

  // Takes a ready unit (waiting while none is) and runs it.
  void run_one(float* buf_a, float* buf_b) {
    Unit u;
    {
      std::unique_lock<std::mutex> lk(m_);
      while (!pick(u)) {
        const int64_t seen = finished_.load();  // read under m_: a later finish bumps it
        lk.unlock();
        finished_.wait_at_least(seen + 1);
        lk.lock();
      }
    }
    struct Finish {  // marks the unit done even if it throws: waiters must not hang
      StripeJob& job;
      const Unit& u;
      ~Finish() { job.finish(u); }
    } finish{*this, u};
    const auto& blocks = ctx_.sched.blocks;
    switch (u.kind) {
      case kPack: {
        const int tid = static_cast<int>(u.index), nth = static_cast<int>(n_pack_);
        const ShareRows next = u.block + 1 < n_blocks_ ? ShareRows(ctx_.sched, blocks[u.block + 1], tid, nth)
                                                       : ShareRows();
        pack_share(ctx_, s_, ShareRows(ctx_.sched, blocks[u.block], tid, nth), next, slot(u.block), buf_a, buf_b);
        break;
      }
      case kCompute:  // block 0 initialises the scratch
        compute_share(ctx_, s_, blocks[u.block], slot(u.block), ranges_[u.index], u.block == 0);
        break;
      case kAddOut:
        add_share_to_out(ctx_, s_, ranges_[u.index]);
        break;
    }
  }

 private:
  enum Kind { kPack, kCompute, kAddOut };
  struct Unit {
    Kind kind;
    int64_t block, index;  // index: the share (pack) or the chain
  };

  const Slot& slot(int64_t p) const { return ctx_.ring[p % ring_]; }
  bool pack_ready(int64_t p) const {  // block p - ring has left p's slot
    return p < n_blocks_ && consumed_[p % ring_] >= n_compute_ * (p / ring_);
  }
  bool block_packed(int64_t p) const {
    return packed_[p % ring_] >= n_pack_ * (p / ring_ + 1);
  }

  // With m_ held: chooses a ready unit and marks it taken. Packs are handed out in order. Preference:
  // the next pack while it is for at most one block past the leading chain (packed just before it is
  // needed, while its rows are still in cache); else the ready chain that is furthest behind (it frees
  // ring slots); else a pack further ahead (nothing else to do: a peer is slow); else a finished chain's
  // add_out.
  bool pick(Unit& u) {
    const int64_t p_pack = next_pack_ / n_pack_;
    const bool can_pack = pack_ready(p_pack);
    const int64_t lead = *std::max_element(pos_.begin(), pos_.end());
    if (can_pack && p_pack <= lead + 1) return take_pack(u);
    int64_t best = -1;
    for (int64_t c = 0; c < n_compute_; ++c) {
      const int64_t p = pos_[c];
      if (busy_[c] || p >= n_blocks_ || !block_packed(p)) continue;
      if (best < 0 || p < pos_[best]) best = c;
    }
    if (best >= 0) {
      busy_[best] = 1;
      u = {kCompute, pos_[best], best};
      return true;
    }
    if (can_pack) return take_pack(u);
    for (int64_t c = 0; c < n_compute_; ++c) {
      if (busy_[c] || pos_[c] != n_blocks_) continue;
      busy_[c] = 1;  // never released: the chain is finished
      u = {kAddOut, n_blocks_, c};
      return true;
    }
    return false;
  }

  bool take_pack(Unit& u) {
    u = {kPack, next_pack_ / n_pack_, next_pack_ % n_pack_};
    ++next_pack_;
    return true;
  }

  void finish(const Unit& u) {
    {
      std::lock_guard<std::mutex> lk(m_);
      if (u.kind == kPack) {
        ++packed_[u.block % ring_];
      } else if (u.kind == kCompute) {
        ++consumed_[u.block % ring_];
        ++pos_[u.index];
        busy_[u.index] = 0;
      }
    }
    finished_.add();
  }

  const Context& ctx_;
  const Stripe& s_;
  const int64_t n_pack_, n_compute_, n_blocks_, ring_;
  std::vector<PanelRange> ranges_;  // [n_compute]: the chains' columns

  std::mutex m_;                            // the scheduler state below
  Progress finished_;                       // units finished: a chunk with nothing ready waits for the next
  int64_t next_pack_ = 0;                   // pack units handed out, in (block, share) order
  std::vector<int64_t> packed_, consumed_;  // per ring slot, over its whole life: shares packed, chains done
  std::vector<int64_t> pos_;                // per chain: the next block to compute (n_blocks: all done)
  std::vector<char> busy_;                  // per chain: a unit of it is running (or its add_out was taken)
};

void validate(const WeightedGramArgs& g) {
  auto fail = [](const char* what) { throw std::invalid_argument(std::string("weighted_gram: ") + what); };
  if (g.d < 0 || g.n_runs < 0 || g.row_stride < 0) fail("negative size");
  if (g.ld_out < g.d) fail("ld_out < d");
  const int code = static_cast<int>(g.dtype);
  if (code < 0 || code > 2) fail("dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  if (g.d > 0 && g.n_runs > 0) {
    if (g.out == nullptr || g.a == nullptr) fail("null out or a");
    if (g.run_start == nullptr || g.run_len == nullptr || g.run_weight == nullptr) fail("null run arrays");
  }
  if (g.a_sub != nullptr && g.b == nullptr) fail("a_sub requires b (the cross term is not symmetric)");
}

// Ring depth: how far chains may run ahead of a preempted one (ring - 1 K-blocks), within ~24 MiB (at
// least 2 with helpers, so that block p + 1 can be packed while block p is computed). At most 4: deeper
// rings (8 at d = 1024, 15 at d = 256) measured slower, quiet and beside a busy process, as the slots
// the packing cycles through fall out of cache.
int ring_depth(int64_t slot_floats, int nth) {
  if (nth == 1) return 1;
  const int64_t fit = (int64_t(24) << 20) / std::max<int64_t>(1, slot_floats * int64_t(sizeof(float)));
  return static_cast<int>(std::clamp<int64_t>(fit, 2, 4));
}

}  // namespace

void weighted_gram(const WeightedGramArgs& args) {
  validate(args);
  if (args.d == 0 || args.n_runs == 0) return;
  const Schedule sched = build_schedule(args);
  if (sched.blocks.empty()) return;

  const bool symmetric = args.b == nullptr;
  const int64_t d = args.d;
  const int64_t budget = args.scratch_budget_bytes > 0 ? args.scratch_budget_bytes : kDefaultScratchBudget;
  const int64_t width = stripe_width(d, budget);

  std::vector<Stripe> stripes;
  int64_t max_b_panels = 0, max_scratch = 0;
  for (int64_t c0 = 0; c0 < d; c0 += width) {
    stripes.push_back(make_stripe(d, symmetric, c0, std::min(d, c0 + width)));
    max_b_panels = std::max(max_b_panels, stripes.back().b_panels);
    max_scratch = std::max(max_scratch, stripes.back().a_panels * kMR * stripes.back().lds);
  }
  const int64_t a_floats = ceil_div(d, kMR) * kAPanelStride;
  const int64_t b_floats = max_b_panels * kBPanelStride;

  const int requested = args.num_threads > 0 ? args.num_threads : default_num_threads();
  // More threads than B panels of the widest stripe would find nothing to compute.
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(requested, max_b_panels)));
  FloatBuffer scratch = alloc_floats(max_scratch);
  std::vector<Slot> ring(static_cast<size_t>(ring_depth(a_floats + b_floats, threads)));
  for (Slot& slot : ring) {
    slot.a = alloc_floats(a_floats);
    slot.b = alloc_floats(b_floats);
  }
  // Per-thread conversion buffers for kPackGroup rows (A, and B when it is a separate input), zeroed
  // once: columns >= d are never written, which zero-pads the edge panels.
  const int64_t row_len = std::max(round_up(d, kMR), round_up(d, kNR));
  const int64_t per_thread = kPackGroup * row_len * (symmetric ? 1 : 2);
  FloatBuffer row_bufs = alloc_floats(threads * per_thread);
  std::memset(row_bufs.get(), 0, static_cast<size_t>(threads * per_thread) * sizeof(float));
  const Context ctx{args, sched, symmetric, row_len, ring, scratch.get()};

  // One job per stripe: the scratch is reused, so every range of a stripe must be in `out` first.
  for (const Stripe& st : stripes) {
    StripeJob job(ctx, st, threads, static_cast<int64_t>(ring.size()));
    parallel_chunks(job.units(), threads, [&](int64_t, int slot) {
      float* buf_a = row_bufs.get() + slot * per_thread;
      float* buf_b = symmetric ? nullptr : buf_a + kPackGroup * row_len;
      job.run_one(buf_a, buf_b);
    });
  }
}

std::string weighted_gram_build_info() {
  std::string info = MACA_GRAM_AVX2 ? "avx2+fma" : "portable";
  if (MACA_GRAM_F16C) info += " f16c";
  info += " openmp";
  return info;
}

}  // namespace maca
