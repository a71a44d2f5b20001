// Decode attention on the CPU: one query token per sequence, read straight from the KV cache
// rows wherever they live (the paged cache's token-major rows, 11520 elements apart for SmolLM2,
// or a contiguous cache), for every sequence and KV head in parallel. The general path
// (xllm_cpu.cpp `attention`) copies each sequence's K and V into contiguous tensors and calls
// SDPA once per sequence: at batch 8 that was 38% of a SmolLM2 bf16 decode step, most of it
// copies and per-sequence dispatch (torch.profiler).
//
// Per (sequence, KV head): each query head of the group scores the rows 16 at a time (fp32 FMAs
// over head_dim, the 16 sums from one transpose-and-add tree), softmax in fp32 (max-subtracted,
// std::exp), then sums the V rows weighted, rounded to the activation dtype once.
#include "xllm_avx512.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

#ifdef XLLM_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
using xllm_avx512::load16;
using xllm_avx512::reduce16;

// Prefetch one cache row (16 * DV elements) into L1.
template <typename T, int DV>
inline void prefetch_row(const T* p) {
#pragma GCC unroll 8
  for (int off = 0; off < 16 * DV * int(sizeof(T)); off += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p) + off, _MM_HINT_T0);
}

// How many rows ahead to prefetch: the rows of a paged cache sit on separate pages (one token's
// layers apart), where the hardware prefetcher does not follow.
constexpr int64_t kAhead = 16;

// out = softmax(scale * q . K[lo:len]) . V[lo:len] for the query heads q[0..g) (q_stride apart)
// sharing one KV head; K/V rows `row` elements apart; DV = head_dim / 16.
template <typename T, int DV>
void head_group(const T* q, int64_t q_stride, int64_t g, const T* k, const T* v, int64_t row,
                int64_t lo, int64_t len, float scale, T* out, int64_t out_stride,
                std::vector<float>& scores) {
  const int64_t n = len - lo;
  scores.resize(n + 16);
  for (int64_t j = 0; j < g; ++j) {
    __m512 qv[DV];
    const __m512 s = _mm512_set1_ps(scale);
#pragma GCC unroll 8
    for (int d = 0; d < DV; ++d) qv[d] = _mm512_mul_ps(load16(q + j * q_stride + 16 * d), s);
    auto dot = [&](int64_t t) __attribute__((always_inline)) {
      const T* kr = k + t * row;
      __m512 acc = _mm512_mul_ps(qv[0], load16(kr));
#pragma GCC unroll 8
      for (int d = 1; d < DV; ++d) acc = _mm512_fmadd_ps(qv[d], load16(kr + 16 * d), acc);
      return acc;
    };
    int64_t t = lo;
    if (j == 0)
      for (int64_t i = lo; i < std::min(len, lo + kAhead); ++i) prefetch_row<T, DV>(k + i * row);
    for (; t + 16 <= len; t += 16) {
      if (j == 0)
        for (int64_t i = t + kAhead; i < std::min(len, t + 16 + kAhead); ++i)
          prefetch_row<T, DV>(k + i * row);
      __m512 part[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) part[i] = dot(t + i);
      _mm512_storeu_ps(scores.data() + (t - lo), reduce16(part));
    }
    for (; t < len; ++t) scores[t - lo] = _mm512_reduce_add_ps(dot(t));
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; ++i) top = std::max(top, scores[i]);
    float sum = 0.f;
    for (int64_t i = 0; i < n; ++i) sum += (scores[i] = std::exp(scores[i] - top));
    __m512 acc[DV];
#pragma GCC unroll 8
    for (int d = 0; d < DV; ++d) acc[d] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; ++i) {
      if (j == 0 && i + kAhead < n) prefetch_row<T, DV>(v + (lo + i + kAhead) * row);
      const __m512 p = _mm512_set1_ps(scores[i]);
      const T* vr = v + (lo + i) * row;
#pragma GCC unroll 8
      for (int d = 0; d < DV; ++d) acc[d] = _mm512_fmadd_ps(p, load16(vr + 16 * d), acc[d]);
    }
    const __m512 inv = _mm512_set1_ps(1.f / sum);
    alignas(64) float o[16 * DV];
#pragma GCC unroll 8
    for (int d = 0; d < DV; ++d) _mm512_store_ps(o + 16 * d, _mm512_mul_ps(acc[d], inv));
    T* dst = out + j * out_stride;
    for (int d = 0; d < 16 * DV; ++d) dst[d] = static_cast<T>(o[d]);
  }
}

template <typename T, int DV>
void decode_all(const at::Tensor& q, const at::Tensor& cache, const int64_t* slot,
                const int64_t* slen, int64_t window, float scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), Hkv = cache.size(3);
  const int64_t g = H / Hkv;
  const T* qp = q.const_data_ptr<T>();
  const T* cp = cache.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t kv_stride = cache.stride(0), slot_stride = cache.stride(1);
  const int64_t row = cache.stride(2), head_stride = cache.stride(3);
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), os0 = out.stride(0), os1 = out.stride(1);
  int64_t longest = 1;
  for (int64_t b = 0; b < B; ++b) longest = std::max(longest, slen[b]);
  // one task per (sequence, KV head); a thread takes at least ~256 rows (~10 us of work)
  const int64_t grain = std::max<int64_t>(1, 256 / longest);
  xllm_parallel_for(B * Hkv, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, h = task % Hkv, len = slen[b];
      const int64_t lo = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const T* k = cp + slot[b] * slot_stride + h * head_stride;
      head_group<T, DV>(qp + b * qs0 + h * g * qs1, qs1, g, k, k + kv_stride, row, lo, len, scale,
                        op + b * os0 + h * g * os1, os1, scores);
    }
  });
}

#pragma GCC pop_options
#endif

}  // namespace

// Attention of B one-token queries q [B, H, D] over this layer's cache [2, S, M, Hkv, D]
// (sequence b in slot slot[b], its first slen[b] rows, the last `window` only when window > 0)
// into out [B, H, D]. Returns false, touching nothing, where the fast path does not apply: no
// AVX512, a dtype other than fp32/bf16 or mixed, head_dim not 64 or 128, or layouts it does not
// take (the caller then runs the general path).
bool xllm_decode_attention(const at::Tensor& q, const at::Tensor& cache, const int64_t* slot,
                           const int64_t* slen, int64_t window, double scale, at::Tensor& out) {
#ifdef XLLM_AVX512
  const auto dt = q.scalar_type();
  if (!xllm_use_avx512() || (dt != at::kFloat && dt != at::kBFloat16)) return false;
  if (cache.scalar_type() != dt || out.scalar_type() != dt || q.dim() != 3 || cache.dim() != 5)
    return false;
  const int64_t D = q.size(2), H = q.size(1), Hkv = cache.size(3);
  if ((D != 64 && D != 128) || cache.size(4) != D || H % Hkv != 0) return false;
  if (q.stride(2) != 1 || cache.stride(4) != 1 || out.stride(2) != 1) return false;
  for (int64_t b = 0; b < q.size(0); ++b)
    if (slen[b] < 1 || slen[b] > cache.size(2) || slot[b] < 0 || slot[b] >= cache.size(1))
      return false;
  const float s = static_cast<float>(scale);
  if (dt == at::kFloat) {
    D == 64 ? decode_all<float, 4>(q, cache, slot, slen, window, s, out)
            : decode_all<float, 8>(q, cache, slot, slen, window, s, out);
  } else {
    D == 64 ? decode_all<c10::BFloat16, 4>(q, cache, slot, slen, window, s, out)
            : decode_all<c10::BFloat16, 8>(q, cache, slot, slen, window, s, out);
  }
  return true;
#else
  return false;
#endif
}
