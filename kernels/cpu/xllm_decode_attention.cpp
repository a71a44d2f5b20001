// Decode attention on the CPU: one query token per sequence, read straight from the KV cache
// rows wherever they live (the paged cache's token-major rows, 11520 elements apart for SmolLM2,
// or a contiguous cache), for every sequence and KV head in parallel. The general path
// (xllm_cpu.cpp `attention`) copies each sequence's K and V into contiguous tensors and calls
// SDPA once per sequence: at batch 8 that was 38% of a SmolLM2 bf16 decode step, most of it
// copies and per-sequence dispatch (torch.profiler).
//
// Per (sequence, KV head): every K row is loaded once for all query heads of the group, which
// score it with fp32 FMAs over head_dim (16 rows' sums from one transpose-and-add tree); softmax
// in fp32 (max-subtracted, a vectorized exp); then every V row, loaded once per 4 (head_dim 64)
// or 2 (128) heads, is summed in weighted, rounded to the activation dtype once.
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

// Query heads per KV head the fast path takes (Llama/Qwen/Mistral use up to 8).
constexpr int64_t kMaxGroup = 16;

// e^x for x <= 0 (scores minus their max), lanes below -87 flush to 0: 2^n * p(r) with
// n = round(x / ln 2), |r| <= ln2 / 2 and p the degree-6 Taylor polynomial (relative error
// < 4e-7, below the fp32 softmax's own rounding at these lengths).
inline __m512 exp_neg(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);  // ln 2, split in two
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// out = softmax(scale * q . K[lo:len]) . V[lo:len] for the g (<= kMaxGroup) query heads q[0..g)
// (q_stride apart) sharing one KV head; K/V rows `row` elements apart; DV = head_dim / 16.
// Each K and V row is loaded (and widened) once for all g heads; scores [g][n16] in `scores`.
template <typename T, int DV>
void head_group(const T* q, int64_t q_stride, int64_t g, const T* k, const T* v, int64_t row,
                int64_t lo, int64_t len, float scale, T* out, int64_t out_stride,
                std::vector<float>& scores) {
  const int64_t n = len - lo, n16 = (n + 15) / 16 * 16;
  scores.resize(g * n16);
  float* sc = scores.data();
  __m512 qv[kMaxGroup][DV];
  for (int64_t j = 0; j < g; ++j)
#pragma GCC unroll 8
    for (int d = 0; d < DV; ++d)
      qv[j][d] = _mm512_mul_ps(load16(q + j * q_stride + 16 * d), _mm512_set1_ps(scale));
  // scores, 16 rows at a time: part[j][i] holds row i's products for head j, summed by one tree
  for (int64_t i = 0; i < std::min(n, kAhead); ++i) prefetch_row<T, DV>(k + (lo + i) * row);
  alignas(64) __m512 part[kMaxGroup][16];
  for (int64_t t = 0; t < n; t += 16) {
    const int64_t rows = std::min<int64_t>(16, n - t);
    for (int64_t i = t + kAhead; i < std::min(n, t + 16 + kAhead); ++i)
      prefetch_row<T, DV>(k + (lo + i) * row);
    for (int64_t i = 0; i < 16; ++i) {
      if (i >= rows) {  // past the end: zero products (their lanes are dropped below)
        for (int64_t j = 0; j < g; ++j) part[j][i] = _mm512_setzero_ps();
        continue;
      }
      const T* kr = k + (lo + t + i) * row;
      __m512 kv[DV];
#pragma GCC unroll 8
      for (int d = 0; d < DV; ++d) kv[d] = load16(kr + 16 * d);
      for (int64_t j = 0; j < g; ++j) {
        __m512 acc = _mm512_mul_ps(qv[j][0], kv[0]);
#pragma GCC unroll 8
        for (int d = 1; d < DV; ++d) acc = _mm512_fmadd_ps(qv[j][d], kv[d], acc);
        part[j][i] = acc;
      }
    }
    for (int64_t j = 0; j < g; ++j) _mm512_storeu_ps(sc + j * n16 + t, reduce16(part[j]));
  }
  // softmax numerators in place, per head; the lanes past n are set to 0
  float inv[kMaxGroup];
  const __mmask16 tail = n % 16 ? __mmask16((1u << (n % 16)) - 1) : __mmask16(0xFFFF);
  for (int64_t j = 0; j < g; ++j) {
    float* s = sc + j * n16;
    __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t t = 0; t < n16; t += 16)
      top = _mm512_mask_max_ps(top, t + 16 <= n ? __mmask16(0xFFFF) : tail, top,
                               _mm512_loadu_ps(s + t));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < n16; t += 16) {
      const __mmask16 live = t + 16 <= n ? __mmask16(0xFFFF) : tail;
      const __m512 e = _mm512_maskz_mov_ps(live, exp_neg(_mm512_sub_ps(_mm512_loadu_ps(s + t), m)));
      _mm512_storeu_ps(s + t, e);
      sum = _mm512_add_ps(sum, e);
    }
    inv[j] = 1.f / _mm512_reduce_add_ps(sum);
  }
  // weighted V rows: heads in chunks of JC (JC * DV accumulators stay in registers)
  constexpr int JC = 16 / DV;
  for (int64_t i = 0; i < std::min(n, kAhead); ++i) prefetch_row<T, DV>(v + (lo + i) * row);
  for (int64_t j0 = 0; j0 < g; j0 += JC) {
    const int64_t jn = std::min<int64_t>(JC, g - j0);
    __m512 acc[JC][DV];
#pragma GCC unroll 4
    for (int j = 0; j < JC; ++j)
#pragma GCC unroll 8
      for (int d = 0; d < DV; ++d) acc[j][d] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; ++i) {
      if (j0 == 0 && i + kAhead < n) prefetch_row<T, DV>(v + (lo + i + kAhead) * row);
      const T* vr = v + (lo + i) * row;
      __m512 vv[DV];
#pragma GCC unroll 8
      for (int d = 0; d < DV; ++d) vv[d] = load16(vr + 16 * d);
#pragma GCC unroll 4
      for (int j = 0; j < JC; ++j) {
        if (j >= jn) break;
        const __m512 p = _mm512_set1_ps(sc[(j0 + j) * n16 + i]);
#pragma GCC unroll 8
        for (int d = 0; d < DV; ++d) acc[j][d] = _mm512_fmadd_ps(p, vv[d], acc[j][d]);
      }
    }
    for (int64_t j = 0; j < jn; ++j) {
      alignas(64) float o[16 * DV];
      const __m512 w = _mm512_set1_ps(inv[j0 + j]);
#pragma GCC unroll 8
      for (int d = 0; d < DV; ++d) _mm512_store_ps(o + 16 * d, _mm512_mul_ps(acc[j][d], w));
      T* dst = out + (j0 + j) * out_stride;
      for (int d = 0; d < 16 * DV; ++d) dst[d] = static_cast<T>(o[d]);
    }
  }
}


#pragma GCC pop_options
#endif

// ---- AVX2: the same algorithm on 8 lanes (CPUs without AVX512, or ATEN_CPU_CAPABILITY=avx2) ----
#ifdef XLLM_AVX512  // (x86-64 GCC; this section needs AVX2 only)
#pragma GCC push_options
#pragma GCC target("avx2,fma")

template <typename T>
inline __m256 load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

// Prefetch one cache row (8 * DV elements) into L1.
template <typename T, int DV>
inline void prefetch_row_256(const T* p) {
#pragma GCC unroll 8
  for (int off = 0; off < 8 * DV * int(sizeof(T)); off += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p) + off, _MM_HINT_T0);
}

// The 8 sums of 8 vectors (lane i of the result: the sum of v[i]).
inline __m256 reduce8(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// exp_neg on 8 lanes: 2^n by the exponent bits (n >= -126 after the clamp), the same polynomial.
inline __m256 exp_neg8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

inline float hsum8(__m256 v) {
  __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_add_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)));
}

// head_group on 8 lanes, DV = head_dim / 8: scores 8 rows at a time (one reduce8 tree per head),
// softmax, then the weighted V rows one head and 8 vectors (64 elements) of head_dim at a time.
template <typename T, int DV>
void head_group_256(const T* q, int64_t q_stride, int64_t g, const T* k, const T* v, int64_t row,
                    int64_t lo, int64_t len, float scale, T* out, int64_t out_stride,
                    std::vector<float>& scores) {
  const int64_t n = len - lo, n8 = (n + 7) / 8 * 8;
  scores.resize(g * n8);
  float* sc = scores.data();
  alignas(32) float qs[kMaxGroup][8 * DV];  // the scaled queries, fp32
  for (int64_t j = 0; j < g; ++j)
    for (int d = 0; d < DV; ++d)
      _mm256_store_ps(qs[j] + 8 * d, _mm256_mul_ps(load8(q + j * q_stride + 8 * d), _mm256_set1_ps(scale)));
  for (int64_t i = 0; i < std::min(n, kAhead); ++i) prefetch_row_256<T, DV>(k + (lo + i) * row);
  __m256 part[kMaxGroup][8];
  for (int64_t t = 0; t < n; t += 8) {
    const int64_t rows = std::min<int64_t>(8, n - t);
    for (int64_t i = t + kAhead; i < std::min(n, t + 8 + kAhead); ++i)
      prefetch_row_256<T, DV>(k + (lo + i) * row);
    for (int64_t i = 0; i < 8; ++i) {
      if (i >= rows) {
        for (int64_t j = 0; j < g; ++j) part[j][i] = _mm256_setzero_ps();
        continue;
      }
      const T* kr = k + (lo + t + i) * row;
      __m256 kv[DV];
#pragma GCC unroll 16
      for (int d = 0; d < DV; ++d) kv[d] = load8(kr + 8 * d);
      for (int64_t j = 0; j < g; ++j) {
        __m256 acc = _mm256_mul_ps(_mm256_load_ps(qs[j]), kv[0]);
#pragma GCC unroll 16
        for (int d = 1; d < DV; ++d) acc = _mm256_fmadd_ps(_mm256_load_ps(qs[j] + 8 * d), kv[d], acc);
        part[j][i] = acc;
      }
    }
    for (int64_t j = 0; j < g; ++j) _mm256_storeu_ps(sc + j * n8 + t, reduce8(part[j]));
  }
  float inv[kMaxGroup];
  for (int64_t j = 0; j < g; ++j) {
    float* s = sc + j * n8;
    for (int64_t i = n; i < n8; ++i) s[i] = -std::numeric_limits<float>::infinity();
    __m256 top = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t t = 0; t < n8; t += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(s + t));
    const __m256 m = _mm256_set1_ps(hmax8(top));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t t = 0; t < n8; t += 8) {
      __m256 e = exp_neg8(_mm256_sub_ps(_mm256_loadu_ps(s + t), m));
      if (t + 8 > n)  // the lanes past n: exp(-inf) is clamped, not 0
        e = _mm256_and_ps(e, _mm256_castsi256_ps(_mm256_cmpgt_epi32(
                                 _mm256_set1_epi32(static_cast<int>(n - t)),
                                 _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))));
      _mm256_storeu_ps(s + t, e);
      sum = _mm256_add_ps(sum, e);
    }
    inv[j] = 1.f / hsum8(sum);
  }
  for (int64_t i = 0; i < std::min(n, kAhead); ++i) prefetch_row_256<T, DV>(v + (lo + i) * row);
  constexpr int DC = DV < 8 ? DV : 8;  // vectors of head_dim a pass
  for (int64_t j = 0; j < g; ++j)
    for (int d0 = 0; d0 < DV; d0 += DC) {
      __m256 acc[DC];
#pragma GCC unroll 8
      for (int d = 0; d < DC; ++d) acc[d] = _mm256_setzero_ps();
      const float* pj = sc + j * n8;
      for (int64_t i = 0; i < n; ++i) {
        if (j == 0 && d0 == 0 && i + kAhead < n) prefetch_row_256<T, DV>(v + (lo + i + kAhead) * row);
        const T* vr = v + (lo + i) * row + 8 * d0;
        const __m256 p = _mm256_set1_ps(pj[i]);
#pragma GCC unroll 8
        for (int d = 0; d < DC; ++d) acc[d] = _mm256_fmadd_ps(p, load8(vr + 8 * d), acc[d]);
      }
      alignas(32) float o[8 * DC];
      const __m256 w = _mm256_set1_ps(inv[j]);
#pragma GCC unroll 8
      for (int d = 0; d < DC; ++d) _mm256_store_ps(o + 8 * d, _mm256_mul_ps(acc[d], w));
      T* dst = out + j * out_stride + 8 * d0;
      for (int d = 0; d < 8 * DC; ++d) dst[d] = static_cast<T>(o[d]);
    }
}

#pragma GCC pop_options
#endif

#ifdef XLLM_AVX512
// Every (sequence, KV head) of the step through `head` (head_group<T, D / 16> or head_group_256<T,
// D / 8>), on ATen's threads. Outside both ISA sections: every CPU runs this part.
template <typename T, typename Head>
void decode_all(const at::Tensor& q, const at::Tensor& cache, const int64_t* slot,
                const int64_t* slen, int64_t window, float scale, at::Tensor& out, Head head) {
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
      head(qp + b * qs0 + h * g * qs1, qs1, g, k, k + kv_stride, row, lo, len, scale,
           op + b * os0 + h * g * os1, os1, scores);
    }
  });
}
#endif

}  // namespace

// Attention of B one-token queries q [B, H, D] over this layer's cache [2, S, M, Hkv, D]
// (sequence b in slot slot[b], its first slen[b] rows, the last `window` only when window > 0)
// into out [B, H, D]. Returns false, touching nothing, where the fast path does not apply: no
// AVX512 or AVX2, a dtype other than fp32/bf16 or mixed, head_dim not 16/32/64/128, more than 16 query
// heads per KV head, or layouts it does not
// take (the caller then runs the general path).
bool xllm_decode_attention(const at::Tensor& q, const at::Tensor& cache, const int64_t* slot,
                           const int64_t* slen, int64_t window, double scale, at::Tensor& out) {
#ifdef XLLM_AVX512
  const auto dt = q.scalar_type();
  static const bool avx2 = at::get_cpu_capability() == "AVX2" && __builtin_cpu_supports("avx2") &&
                          __builtin_cpu_supports("fma");
  const bool wide = xllm_use_avx512();
  if (!(wide || avx2) || (dt != at::kFloat && dt != at::kBFloat16)) return false;
  if (cache.scalar_type() != dt || out.scalar_type() != dt || q.dim() != 3 || cache.dim() != 5)
    return false;
  const int64_t D = q.size(2), H = q.size(1), Hkv = cache.size(3);
  if ((D != 16 && D != 32 && D != 64 && D != 128) || cache.size(4) != D || H % Hkv != 0 ||
      H / Hkv > kMaxGroup)
    return false;
  if (q.stride(2) != 1 || cache.stride(4) != 1 || out.stride(2) != 1) return false;
  for (int64_t b = 0; b < q.size(0); ++b)
    if (slen[b] < 1 || slen[b] > cache.size(2) || slot[b] < 0 || slot[b] >= cache.size(1))
      return false;
  const float s = static_cast<float>(scale);
  auto run = [&](auto dtype_tag) {
    using T = decltype(dtype_tag);
    if (!wide) {
      switch (D) {
        case 16: decode_all<T>(q, cache, slot, slen, window, s, out, head_group_256<T, 2>); break;
        case 32: decode_all<T>(q, cache, slot, slen, window, s, out, head_group_256<T, 4>); break;
        case 64: decode_all<T>(q, cache, slot, slen, window, s, out, head_group_256<T, 8>); break;
        default: decode_all<T>(q, cache, slot, slen, window, s, out, head_group_256<T, 16>); break;
      }
      return;
    }
    switch (D) {
      case 16: decode_all<T>(q, cache, slot, slen, window, s, out, head_group<T, 1>); break;
      case 32: decode_all<T>(q, cache, slot, slen, window, s, out, head_group<T, 2>); break;
      case 64: decode_all<T>(q, cache, slot, slen, window, s, out, head_group<T, 4>); break;
      default: decode_all<T>(q, cache, slot, slen, window, s, out, head_group<T, 8>); break;
    }
  };
  dt == at::kFloat ? run(float{}) : run(c10::BFloat16{});
  return true;
#else
  return false;
#endif
}
