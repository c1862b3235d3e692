// pybind11 bindings: the extension module maca_kernels._C.
//
// Tensors cross this boundary as raw addresses (tensor.data_ptr()) so the module needs no torch
// headers and builds in seconds; the Python launchers own all shape/dtype/stride validation.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "gptq/block_sweep.h"
#include "hessian/weighted_gram.h"

namespace py = pybind11;

void bind_quant_matmul(pybind11::module_& m);  // python/bind_quant_matmul.cpp

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

void gptq_block_sweep(uintptr_t w_ptr, int64_t ld_w, int64_t n_rows, int64_t i1, int64_t count, uintptr_t u_ptr,
                      uintptr_t p_ptr, int64_t ld_u, uintptr_t codes_ptr, int64_t ld_codes, uintptr_t scales_ptr,
                      uintptr_t zeros_ptr, int64_t ld_s, int64_t group_size, uintptr_t group_of_pos_ptr,
                      uintptr_t err_ptr, uintptr_t wq_ptr, int64_t ld_e, int maxq, bool sym, uintptr_t shrink_ptr,
                      int n_shrink, float norm, int num_threads) {
  maca::GptqBlockArgs args;
  args.w = as_ptr<const float>(w_ptr);
  args.ld_w = ld_w;
  args.n_rows = n_rows;
  args.i1 = i1;
  args.count = count;
  args.u = as_ptr<const float>(u_ptr);
  args.p = as_ptr<const float>(p_ptr);
  args.ld_u = ld_u;
  args.gptaq = p_ptr != 0;
  args.codes = as_ptr<int32_t>(codes_ptr);
  args.ld_codes = ld_codes;
  args.scales = as_ptr<float>(scales_ptr);
  args.zeros = as_ptr<float>(zeros_ptr);
  args.ld_s = ld_s;
  args.group_size = group_size;
  args.group_of_pos = as_ptr<const int64_t>(group_of_pos_ptr);
  args.err = as_ptr<float>(err_ptr);
  args.wq = as_ptr<float>(wq_ptr);
  args.ld_e = ld_e;
  args.maxq = maxq;
  args.sym = sym;
  args.shrink = as_ptr<const float>(shrink_ptr);
  args.n_shrink = n_shrink;
  args.norm = norm;
  args.num_threads = num_threads;
  py::gil_scoped_release no_gil;
  maca::gptq_block_sweep(args);
}

void gptq_round_scale(uintptr_t x_ptr, int64_t n, bool software) {
  py::gil_scoped_release no_gil;
  maca::gptq_round_scale(as_ptr<float>(x_ptr), n, software);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "maca_kernels native CPU kernels (C++17 + OpenMP).";
  bind_quant_matmul(m);

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

  m.def("gptq_block_sweep", &gptq_block_sweep, py::arg("w_ptr"), py::arg("ld_w"), py::arg("n_rows"), py::arg("i1"),
        py::arg("count"), py::arg("u_ptr"), py::arg("p_ptr"), py::arg("ld_u"), py::arg("codes_ptr"),
        py::arg("ld_codes"), py::arg("scales_ptr"), py::arg("zeros_ptr"), py::arg("ld_s"), py::arg("group_size"),
        py::arg("group_of_pos_ptr"), py::arg("err_ptr"), py::arg("wq_ptr"), py::arg("ld_e"), py::arg("maxq"),
        py::arg("sym"), py::arg("shrink_ptr"), py::arg("n_shrink"), py::arg("norm"), py::arg("num_threads"),
        R"doc(One column block i1 .. i1+count-1 of the GPTQ / GPTAQ sweep for all n_rows rows (fp32 math).

All *_ptr are raw addresses (tensor.data_ptr()); the caller validates shapes, dtypes and strides.
w: float32 [n_rows, >= i1+count], leading dimension ld_w (read only). u, p: float32 [K, K], leading
dimension ld_u; p_ptr = 0 means no GPTAQ. codes: int32 [n_rows, K] out. scales, zeros: float32
[n_rows, G], leading dimension ld_s: out for dynamic groups (group_size > 0), in for precomputed ones
(group_size = 0, group of each position in int64 group_of_pos[K]). err, wq: float32 [n_rows, >= count]
out, leading dimension ld_e (wq_ptr may be 0). maxq = 2^bits - 1. shrink: float32[n_shrink] MSE range
multipliers (n_shrink = 0: plain min/max), error |dq - w|^norm. num_threads <= 0: OpenMP default.
The GIL is released while computing.)doc");
  m.def("gptq_round_scale", &gptq_round_scale, py::arg("x_ptr"), py::arg("n"), py::arg("software"),
        "In place: clamp float32[n] to [2^-24, 65504] and round through fp16 (software: the portable path).");

  m.def("build_info", &maca::weighted_gram_build_info, "SIMD paths compiled into the CPU kernels.");
  m.def("gptq_build_info", &maca::gptq_build_info, "fp16 path compiled into the GPTQ sweep.");
}
