// The step pool (xllm_pool.h). A batch-1 decode step is ~120 quantized linears of 10-60 us with
// ~25 us of single-threaded glue (norms, rotary, attention) a layer between them: one parallel
// region per linear pays a fork and a join each time, and the memory bus idles during the glue
// while the next weight is known. Here one region spans the replay: the calling thread (the
// master) runs the program; the workers spin on `gen` for tasks (a function and each thread's
// row range) and, between tasks, prefetch the head of their share of the next linear's weight
// into their own L2 (at most kPrefetchCap bytes), so the weight read of a step starts during the
// glue before it; the master does the same for its share while it waits for the workers. At
// batch 1 the split of a linear then counts each thread's prefetched rows at half the cost of
// rows from memory, so that all finish together.
//
// Arithmetic is untouched: a task's f(n0, n1) is the kernel's own loop over its rows, and every
// row's result is the same on any thread and in any split (the kernels' rule).
#include "xllm_pool.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <exception>
#include <mutex>
#include <unistd.h>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define XLLM_POOL_X86 1
#endif

void xllm_parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& f);

namespace {

constexpr int kMaxThreads = 64;
// Bytes a thread prefetches ahead: half its L2 (1-2 MB a core on recent x86 servers), at most
// 512 KB (more is not reached in the glue between two linears)
const int64_t kPrefetchCap = [] {
  int64_t l2 = 0;
#ifdef _SC_LEVEL2_CACHE_SIZE
  l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
  return l2 > 0 ? std::min<int64_t>(512 << 10, l2 / 2) : int64_t{256 << 10};
}();
constexpr int64_t kPrefetchBatch = 8;  // lines between looks at the task counter

inline void relax() {
#ifdef XLLM_POOL_X86
  _mm_pause();
#endif
}

inline void prefetch_line(const char* p) {
#ifdef XLLM_POOL_X86
  _mm_prefetch(p, _MM_HINT_T1);  // into L2: L1 keeps the activations and the running rows
#else
  __builtin_prefetch(p, 0, 2);
#endif
}

// Counters since load (xllm_pool_stats): written by masters only
std::atomic<int64_t> n_runs{0}, n_tasks{0}, n_linears{0}, n_rows{0}, n_held{0};

struct Linear {  // a quantized linear's weight
  const char* w = nullptr;
  int64_t row_bytes = 0, rows = 0;
};

// Where thread t's nominal share of `rows` starts (rows in fours: the kernels' batch-1 unit).
inline int64_t nominal(int64_t rows, int t, int threads) {
  return t >= threads ? rows : rows * t / threads / 4 * 4;
}

struct alignas(64) Progress {  // a thread's prefetch of its share of `target`
  std::atomic<const char*> target{nullptr};
  std::atomic<int64_t> rows{0};  // rows of it in cache, from its nominal start
};

// One thread's prefetch: the head of its nominal share of a linear, a batch of lines a call.
struct Prefetcher {
  const char* w = nullptr;
  int64_t row_bytes = 1, from = 0, to = 0, at = 0;

  void aim(const Linear& l, int t, int threads, Progress& p) {
    w = l.w;
    row_bytes = std::max<int64_t>(l.row_bytes, 1);
    from = nominal(l.rows, t, threads) * l.row_bytes;
    to = std::min(nominal(l.rows, t + 1, threads) * l.row_bytes, from + kPrefetchCap);
    at = from;
    p.rows.store(0, std::memory_order_relaxed);
    p.target.store(l.w, std::memory_order_relaxed);
  }

  bool step(Progress& p) {  // false: nothing left to prefetch
    if (at >= to) return false;
    const int64_t end = std::min(to, at + kPrefetchBatch * 64);
    for (; at < end; at += 64) prefetch_line(w + at);
    p.rows.store((at - from) / row_bytes, std::memory_order_relaxed);
    return true;
  }
};

struct Pool {
  int threads = 1;
  alignas(64) std::atomic<uint64_t> gen{0};  // bumped once a task is posted
  alignas(64) std::atomic<int> done{0};  // workers finished with the current task
  std::atomic<int> joined{0};
  std::atomic<bool> stop{false};
  // the posted task (written by the master before bumping gen)
  const std::function<void(int64_t, int64_t)>* fn = nullptr;
  int64_t bounds[kMaxThreads + 1] = {};
  Linear next;  // a linear task's successor: what each thread prefetches once done with it
  Linear pending;  // set by xllm_pool_next_linear for the coming linear task
  std::exception_ptr error;
  std::mutex error_mutex;
  Progress progress[kMaxThreads];
  Prefetcher master;  // thread 0's, run while it waits for the workers

  void worker(int t) {
    uint64_t seen = 0;
    Prefetcher mine;
    while (true) {
      const uint64_t g = gen.load(std::memory_order_acquire);
      if (g != seen) {
        seen = g;
        if (stop.load(std::memory_order_relaxed)) return;
        if (bounds[t] < bounds[t + 1]) {
          try {
            (*fn)(bounds[t], bounds[t + 1]);
          } catch (...) {
            std::lock_guard<std::mutex> lock(error_mutex);
            if (!error) error = std::current_exception();
          }
        }
        if (next.w != nullptr) mine.aim(next, t, threads, progress[t]);  // before `done`
        done.fetch_add(1, std::memory_order_release);
        continue;
      }
      if (!mine.step(progress[t])) relax();
    }
  }

  // Post bounds (already written) with f to the workers, run thread 0's part, wait for theirs
  // (prefetching thread 0's share of `successor` meanwhile, for a linear's task).
  void post(const std::function<void(int64_t, int64_t)>& f, const Linear& successor) {
    n_tasks.fetch_add(1, std::memory_order_relaxed);
    fn = &f;
    next = successor;
    done.store(0, std::memory_order_relaxed);
    gen.fetch_add(1, std::memory_order_release);
    std::exception_ptr own;
    try {
      if (bounds[0] < bounds[1]) f(bounds[0], bounds[1]);
    } catch (...) {
      own = std::current_exception();
    }
    if (successor.w != nullptr) master.aim(successor, 0, threads, progress[0]);
    // the workers read what f refers to (the caller's frame): wait for them even on an error
    while (done.load(std::memory_order_acquire) != threads - 1) {
      if (!master.step(progress[0])) relax();
    }
    if (own) std::rethrow_exception(own);
    if (error) {
      std::exception_ptr e;
      std::swap(e, error);
      std::rethrow_exception(e);
    }
  }
};

thread_local Pool* current = nullptr;  // the pool this thread is the master of
// Set once regions come without all their threads (OMP_DYNAMIC, a thread limit; or three times
// in a row not in time): from then on replays run plainly rather than wait for workers that do
// not come.
std::atomic<bool> unavailable{false};
std::atomic<int> late{0};  // regions in a row whose workers were not all in within the deadline

}  // namespace

bool xllm_pool_run(const std::function<void()>& body) {
  const int threads = at::get_num_threads();
  if (current != nullptr || threads < 2 || threads > kMaxThreads || at::in_parallel_region() ||
      unavailable.load(std::memory_order_relaxed)) {
    body();
    return false;
  }
  Pool pool;
  pool.threads = threads;
  bool ran = false;
  xllm_parallel_for(threads, 1, [&](int64_t b, int64_t e) {
    if (b != 0) {  // a worker: its id by the order of arrival
      const int t = 1 + pool.joined.fetch_add(1);
      if (t < threads) pool.worker(t);
      return;
    }
    struct Stop {  // the workers leave however this ends
      Pool& p;
      ~Stop() {
        p.stop.store(true, std::memory_order_relaxed);
        p.gen.fetch_add(1, std::memory_order_release);
        current = nullptr;
      }
    } stop{pool};
    if (e - b > 1) {  // one thread for several parts: run plainly below
      unavailable.store(true, std::memory_order_relaxed);
      return;
    }
    // every worker must be in before a task is posted (else its rows would never run)
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(20);
    while (pool.joined.load(std::memory_order_acquire) < threads - 1) {
      if (std::chrono::steady_clock::now() > deadline) {  // run plainly below
        if (late.fetch_add(1, std::memory_order_relaxed) + 1 >= 3)
          unavailable.store(true, std::memory_order_relaxed);
        return;
      }
      relax();
    }
    late.store(0, std::memory_order_relaxed);
    current = &pool;
    ran = true;
    n_runs.fetch_add(1, std::memory_order_relaxed);
    body();
  });
  if (!ran) body();
  return ran;
}

bool xllm_pool_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& f) {
  Pool* pool = current;
  if (pool == nullptr) return false;
  if (n <= grain) {
    if (n > 0) f(0, n);
    return true;
  }
  const int parts = static_cast<int>(std::min<int64_t>(pool->threads, (n + grain - 1) / grain));
  for (int t = 0; t <= pool->threads; ++t) pool->bounds[t] = t >= parts ? n : n * t / parts;
  pool->post(f, Linear{});
  return true;
}

void xllm_pool_next_linear(const void* w, int64_t row_bytes, int64_t rows) {
  if (current != nullptr) current->pending = Linear{static_cast<const char*>(w), row_bytes, rows};
}

bool xllm_pool_linear(const void* w, int64_t row_bytes, int64_t rows, int64_t grain,
                      int64_t batch, const std::function<void(int64_t, int64_t)>& f) {
  Pool* pool = current;
  if (pool == nullptr || rows <= grain || row_bytes <= 0) return false;
  const int T = pool->threads;
  // the rows each thread holds from its nominal start, prefetched: at batch 1 they cost it
  // about half a row read from memory, so its share is c + held / 2 rows (all threads' costs
  // equal at c); with more activation rows the kernel is bound by its arithmetic as much as by
  // memory, and the shares stay even (measured: 6% slower at batch 8 with the batch-1 split)
  int64_t held[kMaxThreads] = {};
  int64_t sum = 0;
  for (int t = 0; t < T && batch == 1; ++t) {
    if (pool->progress[t].target.load(std::memory_order_relaxed) != w) continue;
    held[t] = std::min(pool->progress[t].rows.load(std::memory_order_relaxed),
                       nominal(rows, t + 1, T) - nominal(rows, t, T));
    sum += held[t];
  }
  const int64_t c = (rows - sum / 2) / T;
  int64_t b = 0;
  pool->bounds[0] = 0;
  for (int t = 1; t <= T; ++t) {
    b += c + held[t - 1] / 2;
    pool->bounds[t] = t == T ? rows : std::clamp<int64_t>(b / 4 * 4, pool->bounds[t - 1], rows);
  }
  // with no successor the threads stop prefetching (their target: this weight, none of it)
  const Linear successor = pool->pending.w ? pool->pending : Linear{static_cast<const char*>(w), row_bytes, 0};
  pool->pending = Linear{};
  n_linears.fetch_add(1, std::memory_order_relaxed);
  n_rows.fetch_add(rows, std::memory_order_relaxed);
  n_held.fetch_add(sum, std::memory_order_relaxed);
  pool->post(f, successor);
  return true;
}

std::vector<int64_t> xllm_pool_stats() {
  return {n_runs.load(), n_tasks.load(), n_linears.load(), n_rows.load(), n_held.load()};
}
