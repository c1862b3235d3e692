// GPTQ / GPTAQ column sweep on the CPU: one column block for all rows (the C++ twin of the Triton
// kernel `_gptq_block_kernel` in maca_kernels/ops/gptq/triton_kernel.py).
//
// Rows of W are independent given U (and P): each work chunk (common/parallel.h) owns a tile of rows,
// copies the block's columns of those rows into a column-major tile that stays in L1/L2, and walks them:
// find the group's parameters when a dynamic group starts, quantize the column,
// err = (w - dq) / U_ii, rank-1 update of the rest of the block (GPTAQ: plus w * P_i,:). It writes
// the codes, the new groups' scales/zeros, and the block's Err and W_blk (values at quantization
// time); the lazy update of the later columns is left to the caller (one GEMM per term).
//
// Arithmetic follows maca_kernels/ops/gptq/quantizer.py operation by operation: IEEE fp32 division,
// round-half-to-even, scales at least 2^-24 rounded to fp16 (nearest-even; an overflow as 2^16), and no
// contraction of a*b - c into an FMA (this file is compiled with -ffp-contract=off).
//
// Plain C++17 + OpenMP: no torch and no Python headers. The Python launcher validates every argument;
// this layer only checks what would crash.
#pragma once

#include <cstdint>
#include <string>

namespace maca {

struct GptqBlockArgs {
  // Working weights (processing order), row-major with leading dimension ld_w; the block is the
  // columns i1 .. i1 + count - 1 of rows 0 .. n_rows - 1. Read only.
  const float* w = nullptr;
  int64_t ld_w = 0;
  int64_t n_rows = 0;
  int64_t i1 = 0;
  int64_t count = 0;

  // Upper Cholesky factor of H^-1 and the GPTAQ matrix P, both [K, K] row-major with leading
  // dimension ld_u (P is read only when gptaq).
  const float* u = nullptr;
  const float* p = nullptr;
  int64_t ld_u = 0;
  bool gptaq = false;

  // Codes out: int32 [n_rows, K] (processing order), leading dimension ld_codes; the block's columns
  // are written.
  int32_t* codes = nullptr;
  int64_t ld_codes = 0;

  // Group parameters [n_rows, G] fp32, leading dimension ld_s. Dynamic groups (group_size > 0): out,
  // column (i1 + i) / group_size is written when a group starts at block column i (groups must not
  // straddle blocks: i1 and count are multiples of group_size). Precomputed (group_size == 0): in,
  // the column processed at position c uses group group_of_pos[c].
  float* scales = nullptr;
  float* zeros = nullptr;
  int64_t ld_s = 0;
  int64_t group_size = 0;
  const int64_t* group_of_pos = nullptr;  // [K], precomputed groups only

  // The block's Err and column values at quantization time: [n_rows, count] fp32, leading dimension
  // ld_e (wq may be null when not wanted).
  float* err = nullptr;
  float* wq = nullptr;
  int64_t ld_e = 0;

  int maxq = 15;  // 2^bits - 1
  bool sym = false;

  // MSE grid search over shrunk ranges (dynamic groups only): n_shrink range multipliers (0: plain
  // min/max), error sum |dq - w|^norm.
  const float* shrink = nullptr;
  int n_shrink = 0;
  float norm = 2.4f;

  int num_threads = 0;  // <= 0: the OpenMP default
};

// Processes one column block as described above. Throws std::invalid_argument on arguments that would
// make it read or write out of bounds.
void gptq_block_sweep(const GptqBlockArgs& args);

// fp32 -> fp16 -> fp32 with round-to-nearest-even, the value raised to 2^-24 first and an overflow
// given as 2^16 (the quantizer's scale rounding), in place over n values. software: use the portable
// conversion even when F16C is compiled in (lets the tests check the fallback against torch).
void gptq_round_scale(float* x, int64_t n, bool software);

// "f16c openmp" or "software-fp16 openmp".
std::string gptq_build_info();

}  // namespace maca
