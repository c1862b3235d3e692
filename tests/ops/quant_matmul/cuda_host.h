// The CUDA built-ins and gemv_mma.cu's inline-PTX helpers in host C++, so that the kernel's own source runs on
// the CPU (host_gemv.py builds it with g++ and runs it). Every thread of a CTA is a host thread; CTAs run one
// after another. __syncthreads is a barrier of the CTA's threads; __syncwarp and mma.sync of the warp's 32:
// each lane leaves its fragments in the warp's slot, then computes its own D from all of them (float64 sum of
// the exact products, one rounding to fp32 when added to C). f16x2 / bf16x2 arithmetic rounds once to
// nearest even, as the PTX instructions do. What this cannot show: timing, memory ordering between CTAs that
// run at once, and anything the compiler does differently for the GPU.
#pragma once
#include <atomic>
#include <barrier>
#include <bit>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

#define MACA_HOST_EMULATION 1
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // one CTA at a time: static storage is the CTA's shared memory
#define MACA_DEVICE inline

struct dim3_ {
  unsigned x, y, z;
};
static thread_local dim3_ threadIdx, blockIdx;
static dim3_ gridDim, blockDim;

struct uint4 {
  unsigned x, y, z, w;
};
struct uint2 {
  unsigned x, y;
};
struct float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

namespace host {
constexpr int kMaxWarps = 32;
inline std::unique_ptr<std::barrier<>> cta_barrier;
inline std::unique_ptr<std::barrier<>> warp_barrier[kMaxWarps];
struct Slot {
  unsigned a[32][4], b[32][2];
};
inline Slot slots[kMaxWarps];
alignas(16) inline unsigned char dynamic_smem[228 * 1024];  // the launch's dynamic shared memory

inline double f16(unsigned h) { return double(std::bit_cast<_Float16>(uint16_t(h))); }
inline double bf16(unsigned h) { return double(std::bit_cast<float>(unsigned(h & 0xFFFFu) << 16)); }
inline unsigned to_f16(double v) { return std::bit_cast<uint16_t>(_Float16(v)); }  // one rounding, to nearest even
inline unsigned to_bf16(float f) {                                                 // to nearest even
  unsigned u = std::bit_cast<unsigned>(f);
  return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}
inline unsigned to_bf16_exact(double v) {  // the decode's results are exact: check it
  const float f = float(v);
  if (double(f) != v || (std::bit_cast<unsigned>(f) & 0xFFFFu)) return to_bf16(f);
  return std::bit_cast<unsigned>(f) >> 16;
}
template <class Op>
unsigned each_half(unsigned a, unsigned b, unsigned c, bool bf, Op op) {
  unsigned out = 0;
  for (int h = 0; h < 2; ++h) {
    const unsigned s = 16 * h;
    const double va = bf ? bf16(a >> s) : f16((a >> s) & 0xFFFFu), vb = bf ? bf16(b >> s) : f16((b >> s) & 0xFFFFu),
                 vc = bf ? bf16(c >> s) : f16((c >> s) & 0xFFFFu);
    const double r = op(va, vb, vc);  // exact in float64 for the values the kernel feeds
    out |= (bf ? to_bf16_exact(r) : to_f16(r)) << s;
  }
  return out;
}
}  // namespace host

inline void __syncthreads() { host::cta_barrier->arrive_and_wait(); }
inline void __syncwarp() { host::warp_barrier[threadIdx.x >> 5]->arrive_and_wait(); }
#define MACA_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(host::dynamic_smem)
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }

typedef unsigned int u32;
MACA_DEVICE u32 lop_or(u32 w, u32 mask, u32 magic) { return (w & mask) | magic; }
MACA_DEVICE u32 hsub2(u32 a, u32 b) {
  return host::each_half(a, b, 0, false, [](double x, double y, double) { return x - y; });
}
MACA_DEVICE u32 hfma2(u32 a, u32 b, u32 c) {
  return host::each_half(a, b, c, false, [](double x, double y, double z) { return x * y + z; });
}
MACA_DEVICE u32 bfma2(u32 a, u32 b, u32 c) {
  return host::each_half(a, b, c, true, [](double x, double y, double z) { return x * y + z; });
}
MACA_DEVICE float half_to_float(unsigned short h) { return float(host::f16(h)); }
template <bool BF16>
MACA_DEVICE unsigned short to_x(float f) {
  return BF16 ? host::to_bf16(f) : host::to_f16(double(f));  // float -> half directly: one rounding
}
MACA_DEVICE float load_l2(const float* p) {
  std::atomic_thread_fence(std::memory_order_seq_cst);
  return *static_cast<const volatile float*>(p);
}
MACA_DEVICE uint4 load_x(const uint4* p) { return *p; }
MACA_DEVICE u32 load_u32(const u32* p) { return *p; }
MACA_DEVICE u32 load_u16(const unsigned short* p) { return *p; }

// mma.m16n8k16, row.col, f32 accumulators: lane (g, t) = (lane / 4, lane % 4) holds A rows g, g + 8 and
// columns 2t, 2t + 1, 2t + 8, 2t + 9 (a0: (g, 2t..), a1: (g + 8, 2t..), a2: (g, 2t + 8..), a3: (g + 8, 2t + 8..)),
// B rows 2t, 2t + 1 (b0) and 2t + 8, 2t + 9 (b1) of column g, and D rows g, g + 8, columns 2t, 2t + 1.
template <bool BF16>
MACA_DEVICE void mma16816(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  host::Slot& s = host::slots[w];
  s.a[lane][0] = a0, s.a[lane][1] = a1, s.a[lane][2] = a2, s.a[lane][3] = a3;
  s.b[lane][0] = b0, s.b[lane][1] = b1;
  host::warp_barrier[w]->arrive_and_wait();
  auto val = [](u32 reg, int half) { return BF16 ? host::bf16(reg >> (16 * half)) : host::f16((reg >> (16 * half)) & 0xFFFFu); };
  auto A = [&](int row, int k) {  // the lane holding (row, k) and its register
    const int g = row % 8, t = (k % 8) / 2, r = (row >= 8) + 2 * (k >= 8);
    return val(s.a[4 * g + t][r], k % 2);
  };
  auto B = [&](int k, int col) { return val(s.b[4 * col + (k % 8) / 2][k >= 8], k % 2); };
  const int g = lane / 4, t = lane % 4;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
    double sum = 0;
    for (int k = 0; k < 16; ++k) sum += A(row, k) * B(k, col);
    out[i] = float(double(d[i]) + sum);
  }
  host::warp_barrier[w]->arrive_and_wait();  // every lane has read the slot
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

namespace host {
// Runs fn() on every thread of a grid of CTAs of `threads` threads, one CTA after another, with `smem` bytes
// of dynamic shared memory (NaN-filled before each CTA: what a kernel reads unwritten shows).
inline void run_grid(int gx, int threads, int smem, const std::function<void()>& fn) {
  if (threads % 32 || threads < 32 || threads > 32 * kMaxWarps || smem < 0 || smem > int(sizeof(dynamic_smem))) {
    throw std::invalid_argument("bad launch");
  }
  gridDim = {unsigned(gx), 1u, 1u};
  blockDim = {unsigned(threads), 1u, 1u};
  for (int bx = 0; bx < gx; ++bx) {
    std::memset(dynamic_smem, 0xFF, smem);  // all-ones: NaN in fp16, bf16 and fp32
    cta_barrier = std::make_unique<std::barrier<>>(threads);
    for (int w = 0; w < threads / 32; ++w) warp_barrier[w] = std::make_unique<std::barrier<>>(32);
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([=, &fn] {
        threadIdx = {unsigned(t), 0u, 0u};
        blockIdx = {unsigned(bx), 0u, 0u};
        fn();
      });
    }
    for (auto& th : pool) th.join();
  }
}

// A kernel's arguments from an array of pointers to them (as ctypes lays them out).
template <class F>
struct Launch;
template <class... A>
struct Launch<void(A...)> {
  template <void (*FN)(A...), size_t... I>
  static void call(void** argv, std::index_sequence<I...>) {
    FN(*static_cast<A*>(argv[I])...);
  }
  template <void (*FN)(A...)>
  static void run(int gx, int threads, int smem, void** argv) {
    run_grid(gx, threads, smem, [argv] { call<FN>(argv, std::index_sequence_for<A...>{}); });
  }
};
}  // namespace host
