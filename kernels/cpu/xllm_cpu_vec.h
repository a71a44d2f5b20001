// The AVX2 build of the fused loops (xllm_cpu_avx2.cpp), as xllm_cpu.cpp calls it: plain
// pointers in, one instantiation per activation dtype (float, BFloat16, Half). Defined only in
// x86-64 GCC builds (where xllm_cpu.cpp's AVX512 section exists too); callers run them only
// where ATen picked AVX2.
// kernels/cpu/build.py hashes this header into the build: editing it rebuilds.
#pragma once

#include <cstdint>
#include <functional>

// Defined in xllm_cpu.cpp: f(begin, end) over [0, n) on ATen's intra-op threads.
void xllm_parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& f);

// A tensor's heads for the rotary loop: x [tokens, heads, D] (strides t, h), out contiguous.
template <typename T>
struct XllmHeads {
  const T* x;
  T* out;
  int64_t heads, stride_t, stride_h;
};

template <typename T>
void xllm_avx2_rms_rows(const T* x, const T* res, const T* w, T* out, T* res_out, int64_t rows,
                        int64_t d, float eps, int64_t grain);
template <typename T>
void xllm_avx2_silu_mul_rows(const T* g, int64_t gs, const T* u, int64_t us, T* out, int64_t rows,
                             int64_t n, int64_t grain);
template <typename T>
void xllm_avx2_rotary_tokens(const XllmHeads<T>& q, const XllmHeads<T>& k, const T* cos,
                             const T* sin, int64_t cs_stride, int64_t width, int64_t tokens,
                             int64_t d, bool is_neox, int64_t grain);
