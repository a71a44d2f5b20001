// A step pool: ATen's intra-op threads held for the whole of a CpuProgram replay (one parallel
// region a step instead of one per op), handed work by spinning on a counter; between tasks the
// workers prefetch their share of the next quantized linear's weight (xllm_pool.cpp).
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

// Runs body() on this thread with the pool's workers started for it, or plainly where they
// cannot start (one thread, already inside a parallel region). True when the pool ran.
bool xllm_pool_run(const std::function<void()>& body);

// f over [0, n) in chunks of at least `grain`, on the running pool of the calling thread: false
// when this thread runs no pool (the caller takes its usual parallel path).
bool xllm_pool_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& f);

// A linear's rows over the pool: f(n0, n1) over [0, rows) of a weight of `row_bytes` a row at
// `w` times `batch` activation rows; at batch 1 the rows each thread already prefetched count as
// half their cost in the split. False when this thread runs no pool or rows <= grain (nothing
// to share).
bool xllm_pool_linear(const void* w, int64_t row_bytes, int64_t rows, int64_t grain,
                      int64_t batch, const std::function<void(int64_t, int64_t)>& f);

// The weight of the quantized linear after the one about to run (CpuProgram tells it): its
// workers prefetch their shares of it once they finish the current one. No-op without a pool.
void xllm_pool_next_linear(const void* w, int64_t row_bytes, int64_t rows);

// Since the library loaded: [replays run on a pool, tasks posted, of them linears, their weight
// rows, of those the rows a thread held prefetched when its task came].
std::vector<int64_t> xllm_pool_stats();
