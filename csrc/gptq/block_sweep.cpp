// GPTQ / GPTAQ column sweep, one column block for all rows (see block_sweep.h).
//
// Layout: each work chunk (common/parallel.h) owns kRowTile rows and copies the block's columns of
// those rows into a column-major tile t[j * kRowTile + r] (kRowTile x 128 fp32 = 16 KB for the default
// block, so it stays in L1 while the block is walked). Every per-column step is then a loop over
// kRowTile contiguous floats with a compile-time trip count, which the compiler turns into whole AVX
// registers: quantize column i of all rows at once, and the rank-1 update t[j] -= err * U[i, j] (j > i)
// is one broadcast + multiply + subtract per register. Column i is never written after it is quantized, so
// at the end the tile holds W_blk (the values at quantization time) for GPTAQ's lazy update.
//
// Bit-for-bit agreement with quantizer.py / reference.py: every operation is the same IEEE fp32
// operation in the same order as the PyTorch code (x / scale is a true division, round-half-even via
// nearbyint under the default rounding mode, w - err * u is a product then a difference: this file
// is compiled with -ffp-contract=off, never -ffast-math). The one place that cannot match exactly is
// the MSE search's error sum: torch computes |e|^2.4 with SLEEF and sums in its own order; here it is
// std::pow and a sequential sum, so two shrink candidates whose errors tie to within rounding may be
// ordered differently.
#include "block_sweep.h"

#include "common/fp16.h"
#include "common/parallel.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#define MACA_GPTQ_F16C 1
#else
#define MACA_GPTQ_F16C 0
#endif

#if defined(__FAST_MATH__)
#error "block_sweep.cpp must not be compiled with -ffast-math"
#endif

namespace maca {
namespace {

constexpr int kRowTile = 32;  // rows per task: one tile column is 4 AVX registers
constexpr float kFp16MinSubnormal = 5.9604644775390625e-08f;  // 2^-24
constexpr float kScaleOverflow = 65536.0f;  // 2^16: a scale past fp16's max (never a valid one: check_scales)

// fp32 -> fp16 -> fp32, round to nearest even (software path: common/fp16.h).
inline float fp16_round_sw(float x) { return half_to_float(float_to_half(x)); }

inline float fp16_round(float x) {
#if MACA_GPTQ_F16C
  return _cvtsh_ss(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT));
#else
  return fp16_round_sw(x);
#endif
}

// quantizer.round_scale: at least 2^-24, through fp16, an overflow (inf) as 2^16.
inline float round_scale(float s) { return std::min(fp16_round(std::max(s, kFp16MinSubnormal)), kScaleOverflow); }

// quantizer.scale_zero for one row.
inline void scale_zero(float xmin, float xmax, int maxq, bool sym, float& scale, float& zero) {
  scale = round_scale((xmax - xmin) / static_cast<float>(maxq));
  if (sym) {
    zero = static_cast<float>((maxq + 1) / 2);
    return;
  }
  float z = std::nearbyint(-xmin / scale);
  if (z < 1.0f) {  // a v1 checkpoint cannot store a zero of 0
    scale = round_scale(xmax / static_cast<float>(maxq - 1));
    z = 1.0f;
  }
  zero = std::min(z, static_cast<float>(maxq));
}

// quantizer.quantize for one value: clamp(round(x / scale) + zero, 0, maxq).
inline float quantize(float x, float scale, float zero, float maxq) {
  float q = std::nearbyint(x / scale) + zero;
  q = q < 0.0f ? 0.0f : q;
  return q > maxq ? maxq : q;
}

// Per-thread scratch: the weight tile, the block's codes and errors, all column-major [count][kRowTile].
struct TileBuffers {
  std::vector<float> w, q, e;
  explicit TileBuffers(int64_t count)
      : w(static_cast<size_t>(count) * kRowTile), q(w.size()), e(w.size()) {}
};

// quantizer.find_params for the kRowTile rows of the tile, over the group's `group` columns starting
// at x (column-major, kRowTile apart).
void find_params_tile(const float* __restrict x, int64_t group, const GptqBlockArgs& a, float* __restrict scale,
                      float* __restrict zero) {
  alignas(32) float xmin[kRowTile], xmax[kRowTile];
  for (int r = 0; r < kRowTile; ++r) xmin[r] = xmax[r] = 0.0f;  // the range always contains 0
  for (int64_t j = 0; j < group; ++j) {
    const float* __restrict col = x + j * kRowTile;
    for (int r = 0; r < kRowTile; ++r) {
      xmin[r] = col[r] < xmin[r] ? col[r] : xmin[r];
      xmax[r] = col[r] > xmax[r] ? col[r] : xmax[r];
    }
  }
  for (int r = 0; r < kRowTile; ++r) {
    if (a.sym) {
      xmax[r] = std::max(-xmin[r], xmax[r]);
      if (xmin[r] < 0.0f) xmin[r] = -xmax[r];
    }
    if (xmin[r] == 0.0f && xmax[r] == 0.0f) {
      xmin[r] = -1.0f;
      xmax[r] = 1.0f;
    }
    scale_zero(xmin[r], xmax[r], a.maxq, a.sym, scale[r], zero[r]);
  }
  if (a.n_shrink <= 0) return;

  const float maxq = static_cast<float>(a.maxq);
  alignas(32) float best[kRowTile], s1[kRowTile], z1[kRowTile], err[kRowTile], dev[kRowTile];
  for (int r = 0; r < kRowTile; ++r) best[r] = INFINITY;
  for (int k = 0; k < a.n_shrink; ++k) {
    const float p = a.shrink[k];
    for (int r = 0; r < kRowTile; ++r) scale_zero(p * xmin[r], p * xmax[r], a.maxq, a.sym, s1[r], z1[r]);
    for (int r = 0; r < kRowTile; ++r) err[r] = 0.0f;
    for (int64_t j = 0; j < group; ++j) {
      const float* __restrict col = x + j * kRowTile;
      for (int r = 0; r < kRowTile; ++r) {
        const float dq = (quantize(col[r], s1[r], z1[r], maxq) - z1[r]) * s1[r];
        dev[r] = std::fabs(dq - col[r]);
      }
      for (int r = 0; r < kRowTile; ++r) err[r] += dev[r] == 0.0f ? 0.0f : std::pow(dev[r], a.norm);
    }
    for (int r = 0; r < kRowTile; ++r) {
      if (err[r] < best[r]) {
        best[r] = err[r];
        scale[r] = s1[r];
        zero[r] = z1[r];
      }
    }
  }
}

void sweep_tile(const GptqBlockArgs& a, int64_t r0, TileBuffers& buf) {
  const int64_t count = a.count;
  const int nr = static_cast<int>(std::min<int64_t>(kRowTile, a.n_rows - r0));
  float* __restrict t = buf.w.data();
  float* __restrict qt = buf.q.data();
  float* __restrict et = buf.e.data();
  const float maxq = static_cast<float>(a.maxq);

  // Gather the block of these rows, transposed; rows past the end are zeros (never written back).
  for (int r = 0; r < nr; ++r) {
    const float* __restrict src = a.w + (r0 + r) * a.ld_w + a.i1;
    for (int64_t j = 0; j < count; ++j) t[j * kRowTile + r] = src[j];
  }
  for (int r = nr; r < kRowTile; ++r)
    for (int64_t j = 0; j < count; ++j) t[j * kRowTile + r] = 0.0f;

  alignas(32) float scale[kRowTile], zero[kRowTile];
  for (int r = 0; r < kRowTile; ++r) {
    scale[r] = 1.0f;
    zero[r] = 0.0f;
  }
  int64_t cur_group = -1;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t col = a.i1 + i;
    float* __restrict w = t + i * kRowTile;
    if (a.group_size == 0) {
      const int64_t g = a.group_of_pos[col];
      if (g != cur_group) {
        for (int r = 0; r < nr; ++r) {
          scale[r] = a.scales[(r0 + r) * a.ld_s + g];
          zero[r] = a.zeros[(r0 + r) * a.ld_s + g];
        }
        cur_group = g;
      }
    } else if (i % a.group_size == 0) {  // a dynamic group starts: its columns are up to date
      find_params_tile(w, a.group_size, a, scale, zero);
      const int64_t g = col / a.group_size;
      for (int r = 0; r < nr; ++r) {
        a.scales[(r0 + r) * a.ld_s + g] = scale[r];
        a.zeros[(r0 + r) * a.ld_s + g] = zero[r];
      }
    }

    const float* __restrict urow = a.u + col * a.ld_u + a.i1;
    const float d = urow[i];
    float* __restrict q = qt + i * kRowTile;
    float* __restrict e = et + i * kRowTile;
    for (int r = 0; r < kRowTile; ++r) {
      q[r] = quantize(w[r], scale[r], zero[r], maxq);
      const float dq = (q[r] - zero[r]) * scale[r];
      e[r] = (w[r] - dq) / d;
    }
    // Rank-1 update of the rest of the block (U is upper triangular: columns left of i are untouched).
    if (a.gptaq) {
      const float* __restrict prow = a.p + col * a.ld_u + a.i1;
      for (int64_t j = i + 1; j < count; ++j) {
        const float uj = urow[j], pj = prow[j];
        float* __restrict tj = t + j * kRowTile;
        for (int r = 0; r < kRowTile; ++r) {
          const float v = tj[r] - e[r] * uj;
          tj[r] = v + w[r] * pj;
        }
      }
    } else {
      for (int64_t j = i + 1; j < count; ++j) {
        const float uj = urow[j];
        float* __restrict tj = t + j * kRowTile;
        for (int r = 0; r < kRowTile; ++r) tj[r] = tj[r] - e[r] * uj;
      }
    }
  }

  // Scatter codes, Err and W_blk back to row-major.
  for (int r = 0; r < nr; ++r) {
    int32_t* __restrict codes = a.codes + (r0 + r) * a.ld_codes + a.i1;
    float* __restrict err = a.err + (r0 + r) * a.ld_e;
    for (int64_t j = 0; j < count; ++j) {
      codes[j] = static_cast<int32_t>(qt[j * kRowTile + r]);
      err[j] = et[j * kRowTile + r];
    }
    if (a.wq != nullptr) {
      float* __restrict wq = a.wq + (r0 + r) * a.ld_e;
      for (int64_t j = 0; j < count; ++j) wq[j] = t[j * kRowTile + r];
    }
  }
}

void check_args(const GptqBlockArgs& a) {
  auto fail = [](const char* what) { throw std::invalid_argument(std::string("gptq_block_sweep: ") + what); };
  if (a.n_rows < 0 || a.count < 0 || a.i1 < 0) fail("negative size");
  if (a.n_rows == 0 || a.count == 0) return;
  if (!a.w || !a.u || !a.codes || !a.scales || !a.zeros || !a.err) fail("null pointer");
  if (a.gptaq && !a.p) fail("GPTAQ needs P");
  if (a.ld_w < a.i1 + a.count || a.ld_u < a.i1 + a.count || a.ld_codes < a.i1 + a.count || a.ld_e < a.count)
    fail("leading dimension too small");
  if (a.ld_s <= 0) fail("bad scales leading dimension");
  if (a.maxq < 1 || a.maxq > 255) fail("maxq out of range");
  if (a.group_size < 0) fail("negative group size");
  if (a.group_size == 0 && !a.group_of_pos) fail("precomputed groups need group_of_pos");
  if (a.group_size > 0 && (a.i1 % a.group_size || a.count % a.group_size))
    fail("dynamic groups must not straddle blocks (i1 and count multiples of group_size)");
  if (a.group_size > 0 && (a.i1 + a.count) / a.group_size > a.ld_s) fail("scales leading dimension too small");
  if (a.n_shrink > 0 && !a.shrink) fail("MSE search needs the shrink table");
}

}  // namespace

void gptq_block_sweep(const GptqBlockArgs& args) {
  check_args(args);
  if (args.n_rows == 0 || args.count == 0) return;
  const int64_t n_tiles = (args.n_rows + kRowTile - 1) / kRowTile;
  int threads = args.num_threads > 0 ? args.num_threads : default_num_threads();
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n_tiles)));
  // One chunk per row tile (tens of microseconds), claimed dynamically (common/parallel.h): no thread
  // waits at a barrier for a preempted peer. Tiles are independent; each is computed the same way
  // whichever thread runs it.
  std::vector<TileBuffers> bufs;
  bufs.reserve(static_cast<size_t>(threads));
  for (int t = 0; t < threads; ++t) bufs.emplace_back(args.count);
  parallel_chunks(n_tiles, threads, [&](int64_t tile, int slot) { sweep_tile(args, tile * kRowTile, bufs[slot]); });
}

void gptq_round_scale(float* x, int64_t n, bool software) {
  for (int64_t i = 0; i < n; ++i) {
    const float c = std::max(x[i], kFp16MinSubnormal);
    x[i] = std::min(software ? fp16_round_sw(c) : fp16_round(c), kScaleOverflow);
  }
}

std::string gptq_build_info() {
  return std::string(MACA_GPTQ_F16C ? "f16c" : "software-fp16") + " openmp";
}

}  // namespace maca
