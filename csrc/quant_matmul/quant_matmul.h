// Packed low-bit matmul on the CPU, straight from GPTQ checkpoint tensors.
//
//   y[m, n] = sum_k x[m, k] * W[n, k],   W[n, k] = (code[n, k] - zero[n, g(k)]) * scale[n, g(k)]
//
// with g(k) = g_idx[k] when g_idx is given, else k / group_size. fp32 math, fp32 output (overwritten).
// Plain C++17 + OpenMP: no torch and no Python headers. The Python launcher validates every argument;
// this layer only checks what would make it read or write out of bounds.
#pragma once

#include <cstdint>
#include <string>

namespace maca {

// Element type of the activations x (same codes as the Python launchers use).
enum class QuantMatmulXType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct QuantMatmulArgs {
  // Output: float32 [M, N], row-major with leading dimension ldy (elements). Overwritten.
  float* y = nullptr;
  int64_t ldy = 0;

  // Activations: [M, K] with unit stride inside a row and rows ldx elements apart.
  const void* x = nullptr;
  QuantMatmulXType x_dtype = QuantMatmulXType::kFloat32;
  int64_t ldx = 0;

  int64_t M = 0, N = 0, K = 0;

  // GPTQ checkpoint tensors, all contiguous:
  //   qweight int32 [K*bits/32, N]   codes packed along K (a column is one little-endian bit stream);
  //   qzeros  int32 [G, N*bits/32]   zero points packed along N (each row one bit stream);
  //   scales  fp16  [G, N]           raw IEEE half bit patterns;
  //   g_idx   int32 [K] or null      the group of each input column (null: k / group_size).
  const int32_t* qweight = nullptr;
  const int32_t* qzeros = nullptr;
  const uint16_t* scales = nullptr;
  const int32_t* g_idx = nullptr;
  int64_t G = 0;
  int64_t group_size = 0;  // used only without g_idx; must equal K / G then
  int bits = 4;            // 2, 3, 4 or 8
  int zero_offset = 1;     // added to every stored zero: 1 for "gptq" (v1), 0 for "gptq_v2"

  int num_threads = 0;     // <= 0: the OpenMP default
};

// Computes y as described above. Throws std::invalid_argument on arguments that would make it read
// or write out of bounds (bad sizes or bits, null pointers, g_idx entries outside [0, G)).
void quant_matmul(const QuantMatmulArgs& args);

// The dequantized weight, transposed: wt float32 [K, N] row-major, wt[k, n] = (code[n, k] - zero[n, g(k)]) *
// scale[n, g(k)] exactly as written (one rounding), so x @ wt is the fp32 matmul of the dequantized weight.
// Uses the qweight / qzeros / scales / g_idx / G / group_size / bits / zero_offset / N / K / num_threads of
// args (x and y are ignored). Throws std::invalid_argument as quant_matmul does.
void quant_dequantize(const QuantMatmulArgs& args, float* wt);

// Which code paths this build compiled in: "avx2+fma f16c openmp" or "portable openmp".
std::string quant_matmul_build_info();

}  // namespace maca
