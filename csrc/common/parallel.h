// Work sharing for the CPU kernels that stays fast when a core is taken by another process.
//
// Why not `#pragma omp parallel`: every thread of an OpenMP team must reach the end-of-region barrier,
// so when one of them is preempted (any busy process on a 2-core machine will do) the others spin there
// for a whole scheduler slice: a 0.4 ms GEMV took 8-20 ms. Here the calling thread does the work itself,
// claiming chunks from an atomic counter; helper threads (a small persistent pool) join only if they get
// scheduled in time and claim chunks the same way. When the chunks run out, the caller waits only for
// chunks already claimed by a helper — never for a helper that has not started — and it waits by
// blocking (after a short spin), which frees its core for the helper if that one was preempted. Chunks
// are small (tens to hundreds of microseconds), so a late helper costs little either way.
//
// Chunks are claimed in increasing order, so a chunk may wait (Progress::wait_at_least) for work of an
// earlier chunk: whoever holds that one is running it, and nothing waits for later chunks.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <type_traits>

namespace maca {

// The thread count a kernel uses for num_threads <= 0 (the OpenMP default: OMP_NUM_THREADS or the cores).
int default_num_threads();

struct ChunkTask {
  void* ctx;
  void (*call)(void* ctx, int64_t chunk, int slot);
};

// Runs task(chunk, slot) for every chunk in [0, n_chunks), each exactly once, on the calling thread and up
// to threads - 1 helpers. slot in [0, threads) is unique among the threads running at the same time (0 is
// the caller): index per-thread scratch with it. Returns when every chunk is done; the first exception
// thrown by a chunk is rethrown here (later chunks still run). A call made while another call is running
// (from another thread, or nested in a chunk) runs all of its chunks on its own thread.
void run_chunks(int64_t n_chunks, int threads, ChunkTask task);

template <class F>
void parallel_chunks(int64_t n_chunks, int threads, F&& f) {
  using Fn = std::remove_reference_t<F>;
  ChunkTask task{const_cast<void*>(static_cast<const volatile void*>(&f)),
                 [](void* ctx, int64_t chunk, int slot) { (*static_cast<Fn*>(ctx))(chunk, slot); }};
  run_chunks(n_chunks, threads, task);
}

// A counter that only grows, for chunks that depend on other chunks. Waiting spins briefly, then blocks:
// the thread being waited for may be preempted and need this core.
class Progress {
 public:
  int64_t load() const { return value_.load(std::memory_order_acquire); }
  void add(int64_t v = 1);
  void wait_at_least(int64_t target);

 private:
  std::atomic<int64_t> value_{0};
  std::atomic<int> sleepers_{0};
  std::mutex m_;
  std::condition_variable cv_;
};

}  // namespace maca
