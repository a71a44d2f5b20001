// The fused loops of xllm_cpu.cpp (xllm_cpu_vec.inc) compiled a second time, for AVX2 CPUs: the
// JIT build has no -m flags, so xllm_cpu.cpp compiles them for ATen's AVX512 set only, and on a
// CPU without AVX512 (Zen 3, older Xeons) the fused ops fell back to their ATen composites (~25
// ops a layer for the norms, rotary and silu of a decode step). The at::vec headers are included
// here for CPU_CAPABILITY_AVX2, in a namespace of their own; xllm_cpu.cpp calls the entry points
// below where ATen picked AVX2 (ATEN_CPU_CAPABILITY=avx2 on an AVX512 CPU too).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "xllm_cpu_vec.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#pragma GCC optimize("fp-contract=off")  // round each mul as ATen does (explicit fmadd aside)
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY xllm_avx2
// HACK(jit-flags): as in xllm_cpu.cpp, the ISA macros sleef.h tests, for this file only.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace xllm_avx2_loops {
namespace {

template <typename F>
void parallel_rows(int64_t rows, int64_t grain, const F& f) {
  xllm_parallel_for(rows, grain, f);
}

namespace vec {
#include "xllm_cpu_vec.inc"
}  // namespace vec

}  // namespace
}  // namespace xllm_avx2_loops

template <typename T>
void xllm_avx2_rms_rows(const T* x, const T* res, const T* w, T* out, T* res_out, int64_t rows,
                        int64_t d, float eps, int64_t grain) {
  xllm_avx2_loops::vec::rms_rows<T>(x, res, w, out, res_out, rows, d, eps, grain);
}

template <typename T>
void xllm_avx2_silu_mul_rows(const T* g, int64_t gs, const T* u, int64_t us, T* out, int64_t rows,
                             int64_t n, int64_t grain) {
  xllm_avx2_loops::vec::silu_mul_rows<T>(g, gs, u, us, out, rows, n, grain);
}

template <typename T>
void xllm_avx2_rotary_tokens(const XllmHeads<T>& q, const XllmHeads<T>& k, const T* cos,
                             const T* sin, int64_t cs_stride, int64_t width, int64_t tokens,
                             int64_t d, bool is_neox, int64_t grain) {
  using H = xllm_avx2_loops::vec::Heads<T>;
  xllm_avx2_loops::vec::rotary_tokens<T>(H{q.x, q.out, q.heads, q.stride_t, q.stride_h},
                                         H{k.x, k.out, k.heads, k.stride_t, k.stride_h}, cos, sin,
                                         cs_stride, width, tokens, d, is_neox, grain);
}

#define XLLM_INSTANTIATE(T)                                                                    \
  template void xllm_avx2_rms_rows<T>(const T*, const T*, const T*, T*, T*, int64_t, int64_t,  \
                                      float, int64_t);                                         \
  template void xllm_avx2_silu_mul_rows<T>(const T*, int64_t, const T*, int64_t, T*, int64_t,  \
                                           int64_t, int64_t);                                  \
  template void xllm_avx2_rotary_tokens<T>(const XllmHeads<T>&, const XllmHeads<T>&, const T*, \
                                           const T*, int64_t, int64_t, int64_t, int64_t, bool, \
                                           int64_t);
XLLM_INSTANTIATE(float)
XLLM_INSTANTIATE(c10::BFloat16)
XLLM_INSTANTIATE(c10::Half)
#undef XLLM_INSTANTIATE

#undef __AVX__
#undef __AVX2__
#undef __FMA__
#undef __F16C__
#pragma GCC pop_options
#endif
