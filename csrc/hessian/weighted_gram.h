// Weighted Gram matrix on the CPU: the accumulation step of length-aware (MaCa) Hessians.
//
//   out[i, j] += sum_r  w_r * sum_{t in run r}  A[t, i] * B[t, j]        0 <= i, j < d
//
// Plain C++17 + OpenMP: no torch and no Python headers, so the extension builds in seconds.
// The Python launcher validates every argument; this layer only checks what would crash.
#pragma once

#include <cstdint>
#include <string>

namespace maca {

// Element type of the input rows (values match the Python launcher's codes).
enum class InputDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct WeightedGramArgs {
  // Output: float32, row-major [d, d] with leading dimension ld_out (elements). Accumulated into.
  float* out = nullptr;
  int64_t ld_out = 0;
  int64_t d = 0;

  // Inputs: rows of `row_stride` elements, unit stride inside a row, all of the same dtype.
  // A = a, or a - a_sub (in fp32) when a_sub is not null.
  // B = b, or B = A when b is null: the result is symmetric and only its upper triangle is computed.
  const void* a = nullptr;
  const void* a_sub = nullptr;
  const void* b = nullptr;
  InputDType dtype = InputDType::kFloat32;
  int64_t row_stride = 0;

  // Runs of consecutive rows: rows run_start[r] .. run_start[r] + run_len[r] - 1, weight run_weight[r].
  const int64_t* run_start = nullptr;
  const int64_t* run_len = nullptr;
  const float* run_weight = nullptr;
  int64_t n_runs = 0;

  int num_threads = 0;  // <= 0: the OpenMP default

  // Upper bound on the fp32 scratch the kernel allocates for partial results (bytes); larger
  // matrices are processed in column stripes. <= 0: the default (256 MiB).
  int64_t scratch_budget_bytes = 0;
};

// Computes the weighted Gram update described above. Throws std::invalid_argument on arguments
// that would make it read or write out of bounds (negative sizes, null pointers, bad dtype).
void weighted_gram(const WeightedGramArgs& args);

// Which code paths this build compiled in: "avx2+fma f16c openmp" or "portable openmp".
std::string weighted_gram_build_info();

}  // namespace maca
