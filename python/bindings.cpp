// pybind11 bindings: the extension module maca_kernels._C.
//
// Tensors cross this boundary as raw addresses (tensor.data_ptr()) so the module needs no torch
// headers and builds in seconds; the Python launchers own all shape/dtype/stride validation.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "hessian/weighted_gram.h"

namespace py = pybind11;

namespace {

template <typename T>
T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void weighted_gram(uintptr_t out_ptr, int64_t ld_out, int64_t d, uintptr_t a_ptr, uintptr_t a_sub_ptr,
                   uintptr_t b_ptr, int dtype, int64_t row_stride, uintptr_t run_start_ptr, uintptr_t run_len_ptr,
                   uintptr_t run_weight_ptr, int64_t n_runs, int num_threads, int64_t scratch_budget_bytes) {
  maca::WeightedGramArgs args;
  args.out = as_ptr<float>(out_ptr);
  args.ld_out = ld_out;
  args.d = d;
  args.a = as_ptr<const void>(a_ptr);
  args.a_sub = as_ptr<const void>(a_sub_ptr);
  args.b = as_ptr<const void>(b_ptr);
  args.dtype = static_cast<maca::InputDType>(dtype);
  args.row_stride = row_stride;
  args.run_start = as_ptr<const int64_t>(run_start_ptr);
  args.run_len = as_ptr<const int64_t>(run_len_ptr);
  args.run_weight = as_ptr<const float>(run_weight_ptr);
  args.n_runs = n_runs;
  args.num_threads = num_threads;
  args.scratch_budget_bytes = scratch_budget_bytes;
  py::gil_scoped_release no_gil;  // pure C++ from here on; other Python threads may run
  maca::weighted_gram(args);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "maca_kernels native CPU kernels (C++17 + OpenMP).";

  m.def("weighted_gram", &weighted_gram, py::arg("out_ptr"), py::arg("ld_out"), py::arg("d"), py::arg("a_ptr"),
        py::arg("a_sub_ptr"), py::arg("b_ptr"), py::arg("dtype"), py::arg("row_stride"), py::arg("run_start_ptr"),
        py::arg("run_len_ptr"), py::arg("run_weight_ptr"), py::arg("n_runs"), py::arg("num_threads"),
        py::arg("scratch_budget_bytes") = 0,
        R"doc(out[i, j] += sum_r w_r * sum_{t in run r} A[t, i] * B[t, j] for 0 <= i, j < d (fp32 math).

All *_ptr are raw addresses (tensor.data_ptr()); the caller validates shapes, dtypes and strides.
out: float32 [d, d], leading dimension ld_out. a, a_sub, b: rows of d elements, row_stride elements
apart, dtype 0 = float32, 1 = float16, 2 = bfloat16. A = a - a_sub if a_sub_ptr else a.
B = b if b_ptr else A (symmetric: only the upper triangle is computed, then mirrored).
Runs: run_start/run_len int64[n_runs], run_weight float32[n_runs]. num_threads <= 0: OpenMP default.
scratch_budget_bytes (optional, <= 0: 256 MiB) caps the fp32 scratch; larger d is done in column stripes.
The GIL is released while computing.)doc");

  m.def("build_info", &maca::weighted_gram_build_info, "SIMD paths compiled into the CPU kernels.");
}
