// Chunk pool and Progress counters (see parallel.h for why the kernels do not use OpenMP regions).
#include "common/parallel.h"

#include <omp.h>
#include <unistd.h>
#if defined(__linux__)
#include <sched.h>
#endif

#include <algorithm>
#include <chrono>
#include <exception>
#include <system_error>
#include <thread>

namespace maca {
namespace {

// Spin budgets. Short on purpose: a spinning waiter holds a core that a preempted peer (or another
// process) may need; past the budget, waiters block in the kernel.
constexpr int64_t kCallerSpinNs = 30'000;    // caller waiting for helpers' in-flight chunks
constexpr int64_t kHelperSpinNs = 100'000;   // an idle helper watching for the next job (back-to-back calls)
constexpr int64_t kProgressSpinNs = 30'000;  // a chunk waiting for an earlier chunk
constexpr int kMaxHelpers = 255;

// The CPU the calling thread runs on, or -1 where unknown.
inline int current_cpu() {
#if defined(__linux__)
  return sched_getcpu();
#else
  return -1;
#endif
}

// Moves the calling thread off `cpu` onto another CPU it may use, keeping its affinity mask as it was:
// the kernel migrates a thread at once when its CPU leaves its mask, and restoring the mask does not
// move it back. Returns whether it moved.
bool move_off_cpu(int cpu) {
#if defined(__linux__)
  cpu_set_t allowed;
  if (cpu < 0 || cpu >= CPU_SETSIZE || sched_getaffinity(0, sizeof allowed, &allowed) != 0) return false;
  if (!CPU_ISSET(cpu, &allowed) || CPU_COUNT(&allowed) < 2) return false;
  cpu_set_t others = allowed;
  CPU_CLR(cpu, &others);
  if (sched_setaffinity(0, sizeof others, &others) != 0) return false;
  sched_setaffinity(0, sizeof allowed, &allowed);
  return true;
#else
  (void)cpu;
  return false;
#endif
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Polls done() until it holds or budget_ns elapsed; returns done(). Between polls the thread yields its
// core when yield_now() says so: a helper that shares the caller's core must not keep the caller off it,
// but a yield in general hands the core to any other process for a whole slice, so spins are plain.
template <class Done, class YieldNow>
bool spin_until(Done done, int64_t budget_ns, YieldNow yield_now) {
  using clock = std::chrono::steady_clock;
  if (done()) return true;
  const auto deadline = clock::now() + std::chrono::nanoseconds(budget_ns);
  for (int i = 1;; ++i) {
    for (int k = 0; k < 8; ++k) cpu_relax();
    if (done()) return true;
    if ((i & 15) == 0) {
      if (clock::now() >= deadline) return false;
      if (yield_now()) std::this_thread::yield();
    }
  }
}

template <class Done>
bool spin_until(Done done, int64_t budget_ns) {
  return spin_until(done, budget_ns, [] { return false; });
}

class Pool {
 public:
  pid_t pid() const { return pid_; }

  void run(int64_t n, int threads, ChunkTask task) {
    const int want = static_cast<int>(std::min<int64_t>({threads - 1, n - 1, kMaxHelpers}));
    std::unique_lock<std::mutex> job(caller_, std::try_to_lock);  // busy (another caller, or nested): inline
    if (want <= 0 || !job.owns_lock()) {
      run_inline(n, task);
      return;
    }
    int wake = 0;
    {
      std::lock_guard<std::mutex> lk(m_);
      start_helpers(want);
      task_ = task;
      n_ = n;
      next_.store(0, std::memory_order_relaxed);
      joined_ = 0;
      error_ = nullptr;
      tickets_ = std::min(want, helpers_);
      tickets_hint_.store(tickets_, std::memory_order_release);
      wake = std::min(tickets_, sleepers_);
    }
    for (int i = 0; i < wake; ++i) wake_.notify_one();  // spinning helpers take their ticket unwoken
    work(0);
    {
      std::lock_guard<std::mutex> lk(m_);
      tickets_ = 0;  // closed: helpers that have not joined by now never will
      tickets_hint_.store(0, std::memory_order_relaxed);
    }
    // Wait for the chunks helpers have claimed (not for helpers that never started).
    if (!spin_until([&] { return active_.load(std::memory_order_acquire) == 0; }, kCallerSpinNs)) {
      std::unique_lock<std::mutex> lk(m_);
      done_.wait(lk, [&] { return active_.load(std::memory_order_acquire) == 0; });
    }
    if (error_) std::rethrow_exception(error_);
  }

 private:
  static void run_inline(int64_t n, ChunkTask task) {
    std::exception_ptr error;
    for (int64_t i = 0; i < n; ++i) {
      try {
        task.call(task.ctx, i, 0);
      } catch (...) {
        if (!error) error = std::current_exception();
      }
    }
    if (error) std::rethrow_exception(error);
  }

  bool on_callers_cpu() const {
    const int cpu = current_cpu();
    return cpu >= 0 && cpu == caller_cpu_.load(std::memory_order_relaxed);
  }

  // Claims and runs chunks until none is left. When no core is idle (another busy process), the
  // scheduler wakes a helper on the caller's core, where it would only take turns with the caller and
  // make it wait for a chunk at the end. Such a helper moves itself to another core once per job (where
  // it gets its fair share beside whatever runs there); failing that, it yields without holding a chunk
  // until the chunks run out.
  void work(int slot) {
    bool moved = false;
    for (;;) {
      if (slot == 0) {
        caller_cpu_.store(current_cpu(), std::memory_order_relaxed);
      } else if (on_callers_cpu()) {
        if (next_.load(std::memory_order_relaxed) >= n_) return;
        if (!moved) {
          moved = true;
          if (move_off_cpu(caller_cpu_.load(std::memory_order_relaxed))) continue;
        }
        std::this_thread::yield();
        continue;
      }
      const int64_t i = next_.fetch_add(1, std::memory_order_relaxed);
      if (i >= n_) return;
      try {
        task_.call(task_.ctx, i, slot);
      } catch (...) {
        std::lock_guard<std::mutex> lk(m_);
        if (!error_) error_ = std::current_exception();
      }
    }
  }

  void start_helpers(int want) {  // with m_ held; fewer helpers if the system refuses threads
    while (helpers_ < want) {
      try {
        std::thread(&Pool::helper_main, this).detach();  // never joined: the pool lives until exit
      } catch (const std::system_error&) {
        return;
      }
      ++helpers_;
    }
  }

  void helper_main() {
    std::unique_lock<std::mutex> lk(m_);
    for (;;) {
      if (tickets_ == 0) {
        lk.unlock();
        spin_until([&] { return tickets_hint_.load(std::memory_order_relaxed) > 0; }, kHelperSpinNs,
                   [&] { return on_callers_cpu(); });
        lk.lock();
        ++sleepers_;
        wake_.wait(lk, [&] { return tickets_ > 0; });
        --sleepers_;
      }
      --tickets_;
      tickets_hint_.store(tickets_, std::memory_order_relaxed);
      const int slot = ++joined_;
      active_.fetch_add(1, std::memory_order_relaxed);  // under m_: the caller closes the job under m_
      lk.unlock();
      work(slot);
      const bool last = active_.fetch_sub(1, std::memory_order_acq_rel) == 1;
      lk.lock();
      if (last) done_.notify_all();
    }
  }

  const pid_t pid_ = getpid();
  std::mutex caller_;  // held by the running job's caller
  std::mutex m_;       // everything below except the atomics
  std::condition_variable wake_, done_;
  int helpers_ = 0, sleepers_ = 0, tickets_ = 0, joined_ = 0;
  std::atomic<int> tickets_hint_{0};  // tickets_, for spinning helpers
  std::atomic<int> active_{0};        // helpers inside the current job
  ChunkTask task_{};
  int64_t n_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<int> caller_cpu_{-1};  // where the caller ran its latest chunk
  std::exception_ptr error_;
};

// One pool per process. A forked child starts a new one (the parent's helpers do not exist there);
// the old object is leaked rather than touched, as its mutexes may have been held at the fork.
Pool& pool() {
  static std::atomic<Pool*> current{nullptr};
  Pool* p = current.load(std::memory_order_acquire);
  if (p != nullptr && p->pid() == getpid()) return *p;
  Pool* fresh = new Pool();
  if (current.compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) return *fresh;
  delete fresh;  // another thread installed one first
  return *p;
}

}  // namespace

int default_num_threads() { return std::max(1, omp_get_max_threads()); }

void run_chunks(int64_t n_chunks, int threads, ChunkTask task) {
  if (n_chunks <= 0) return;
  pool().run(n_chunks, threads, task);
}

void Progress::add(int64_t v) {
  value_.fetch_add(v, std::memory_order_seq_cst);
  if (sleepers_.load(std::memory_order_seq_cst) > 0) {
    std::lock_guard<std::mutex> lk(m_);
    cv_.notify_all();
  }
}

void Progress::wait_at_least(int64_t target) {
  if (spin_until([&] { return load() >= target; }, kProgressSpinNs)) return;
  std::unique_lock<std::mutex> lk(m_);
  sleepers_.fetch_add(1, std::memory_order_seq_cst);
  cv_.wait(lk, [&] { return value_.load(std::memory_order_seq_cst) >= target; });
  sleepers_.fetch_sub(1, std::memory_order_relaxed);
}

}  // namespace maca
