// Shared by the hand-written AVX512 kernels (xllm_linear.cpp, xllm_decode_attention.cpp): the
// widening load, the next-rows prefetch and the 16-way sum tree, compiled for AVX512 (GCC on
// x86-64; elsewhere XLLM_AVX512 stays undefined and the kernels call ATen), plus the two helpers
// xllm_cpu.cpp exports. Callers run this code only where xllm_use_avx512() holds.
// kernels/cpu/__init__.py hashes this header into the build flags: editing it rebuilds.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <type_traits>

// Defined in xllm_cpu.cpp: f(begin, end) over [0, n) on ATen's intra-op threads.
void xllm_parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& f);
// Defined in xllm_cpu.cpp: y = x @ w^T (+ b) for prefill sizes (xllm_cpu.cpp says which GEMM).
at::Tensor xllm_dense_linear(const at::Tensor& x, const at::Tensor& w,
                             const std::optional<at::Tensor>& b);
// Defined in xllm_cpu.cpp: whether the AVX512 loops may run on this CPU.
bool xllm_use_avx512();

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define XLLM_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#include <immintrin.h>

namespace xllm_avx512 {

// 16 elements of T (fp32, or bf16: the high half of an fp32) as fp32; masked-off lanes read 0.
template <typename T>
inline __m512 load16(const T* p, __mmask16 m = 0xFFFF) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else {
    static_assert(std::is_same_v<T, c10::BFloat16>);
    __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// Prefetch 64 bytes at element k of each of 4 rows `stride` elements apart (none if null).
template <typename T>
inline void prefetch4(const T* rows, int64_t stride, int64_t k) {
  if (rows == nullptr) return;
#pragma GCC unroll 4
  for (int n = 0; n < 4; ++n)
    _mm_prefetch(reinterpret_cast<const char*>(rows + n * stride + k), _MM_HINT_T0);
}

// Lane i of the result = the sum of v[i]'s 16 lanes, for 16 vectors at once: a transpose-and-add
// tree (45 instructions) instead of 16 horizontal reductions (~7 each).
inline __m512 reduce16(const __m512* v) {
  __m512 s1[8], s2[4];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)  // per 128-bit block: [a0+a2, b0+b2, a1+a3, b1+b3]
    s1[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                          _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // per 128-bit block: [a, b, c, d] partial sums
    const __m512d x = _mm512_castps_pd(s1[2 * i]), y = _mm512_castps_pd(s1[2 * i + 1]);
    s2[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                          _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  auto fold = [](__m512 a, __m512 b) {  // blocks [a0+a1, a2+a3, b0+b1, b2+b3]
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
  };
  return fold(fold(s2[0], s2[1]), fold(s2[2], s2[3]));
}

}  // namespace xllm_avx512

#pragma GCC pop_options
#endif
