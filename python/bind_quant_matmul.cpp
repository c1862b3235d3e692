// pybind11 binding of the CPU packed low-bit matmul (csrc/quant_matmul) into maca_kernels._C.
//
// Like the other bindings, tensors cross as raw addresses (tensor.data_ptr()); the Python launcher
// (maca_kernels/ops/quant_matmul/cpu_kernel.py) validates shapes, dtypes and strides.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "quant_matmul/quant_matmul.h"

namespace py = pybind11;

namespace {

template <typename T>
T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// The weight's fields, shared by both entry points.
maca::QuantMatmulArgs weight_args(int64_t N, int64_t K, uintptr_t qweight_ptr, uintptr_t qzeros_ptr,
                                  uintptr_t scales_ptr, uintptr_t g_idx_ptr, int64_t G, int64_t group_size, int bits,
                                  int zero_offset, int num_threads) {
  maca::QuantMatmulArgs args;
  args.N = N;
  args.K = K;
  args.qweight = as_ptr<const int32_t>(qweight_ptr);
  args.qzeros = as_ptr<const int32_t>(qzeros_ptr);
  args.scales = as_ptr<const uint16_t>(scales_ptr);
  args.g_idx = as_ptr<const int32_t>(g_idx_ptr);
  args.G = G;
  args.group_size = group_size;
  args.bits = bits;
  args.zero_offset = zero_offset;
  args.num_threads = num_threads;
  return args;
}

void quant_matmul(uintptr_t y_ptr, int64_t ldy, uintptr_t x_ptr, int x_dtype, int64_t ldx, int64_t M, int64_t N,
                  int64_t K, uintptr_t qweight_ptr, uintptr_t qzeros_ptr, uintptr_t scales_ptr, uintptr_t g_idx_ptr,
                  int64_t G, int64_t group_size, int bits, int zero_offset, int num_threads) {
  maca::QuantMatmulArgs args = weight_args(N, K, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, G, group_size, bits,
                                           zero_offset, num_threads);
  args.y = as_ptr<float>(y_ptr);
  args.ldy = ldy;
  args.x = as_ptr<const void>(x_ptr);
  args.x_dtype = static_cast<maca::QuantMatmulXType>(x_dtype);
  args.ldx = ldx;
  args.M = M;
  py::gil_scoped_release no_gil;  // pure C++ from here on
  maca::quant_matmul(args);
}

void quant_dequantize(uintptr_t wt_ptr, int64_t N, int64_t K, uintptr_t qweight_ptr, uintptr_t qzeros_ptr,
                      uintptr_t scales_ptr, uintptr_t g_idx_ptr, int64_t G, int64_t group_size, int bits,
                      int zero_offset, int num_threads) {
  const maca::QuantMatmulArgs args = weight_args(N, K, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, G, group_size,
                                                 bits, zero_offset, num_threads);
  py::gil_scoped_release no_gil;
  maca::quant_dequantize(args, as_ptr<float>(wt_ptr));
}

}  // namespace

void bind_quant_matmul(pybind11::module_& m) {
  m.def("quant_matmul", &quant_matmul, py::arg("y_ptr"), py::arg("ldy"), py::arg("x_ptr"), py::arg("x_dtype"),
        py::arg("ldx"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("qweight_ptr"), py::arg("qzeros_ptr"),
        py::arg("scales_ptr"), py::arg("g_idx_ptr"), py::arg("G"), py::arg("group_size"), py::arg("bits"),
        py::arg("zero_offset"), py::arg("num_threads") = 0,
        R"doc(y[M, N] = x[M, K] @ dequant(W)^T in fp32 (y overwritten), from GPTQ checkpoint tensors.

dequant(W)[n, k] = (code[n, k] - zero[n, g(k)]) * scale[n, g(k)], g(k) = g_idx[k] if g_idx_ptr else
k // group_size, zero = stored field + zero_offset (1 for "gptq" v1, 0 for "gptq_v2").
All *_ptr are raw addresses (tensor.data_ptr()); the caller validates shapes, dtypes and strides.
y: float32 rows ldy apart. x: rows ldx apart, x_dtype 0 = float32, 1 = float16, 2 = bfloat16.
qweight int32 [K*bits/32, N], qzeros int32 [G, N*bits/32], scales float16 [G, N], g_idx int32 [K]
(0 for none), all contiguous. bits in {2, 3, 4, 8}. num_threads <= 0: OpenMP default.
The GIL is released while computing.)doc");

  m.def("quant_dequantize", &quant_dequantize, py::arg("wt_ptr"), py::arg("N"), py::arg("K"),
        py::arg("qweight_ptr"), py::arg("qzeros_ptr"), py::arg("scales_ptr"), py::arg("g_idx_ptr"), py::arg("G"),
        py::arg("group_size"), py::arg("bits"), py::arg("zero_offset"), py::arg("num_threads") = 0,
        R"doc(wt[K, N] (float32, contiguous, overwritten) = dequant(W)^T from the same tensors as quant_matmul:
wt[k, n] = (code[n, k] - zero[n, g(k)]) * scale[n, g(k)] in fp32, one rounding. The GIL is released.)doc");

  m.def("quant_matmul_build_info", &maca::quant_matmul_build_info,
        "SIMD paths compiled into the quant_matmul CPU kernel.");
}
