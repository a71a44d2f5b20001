// xllm::linear: y = x @ w^T (+ b) for the few rows of a decode step, streaming each weight row
// from memory once for all rows. ATen's CPU linear (MKL / oneDNN) packs the weight for a GEMM
// from 4 rows up and then reads it at about half the memory bandwidth (SmolLM2's matrices, this
// 2-core AVX512 machine: 24 GB/s at 1-3 rows, 12-14 GB/s at 4-16), and bf16 weights at 10-17 GB/s
// at any row count; a decode step is little else than that read. Here a block of 4 weight rows is
// loaded once and multiplied with up to 4 activation rows at a time (16 fp32 accumulators), the
// block staying in L1 while the next 4 activation rows pass; the 16 sums leave through one
// transpose-and-add tree. fp32: fp32 FMAs. bf16: vdpbf16ps on bf16 rows as they are where the CPU
// has AVX512_BF16, else the weights widened in registers (a shift) against activations widened
// once per call; sums are fp32 either way, the result rounded once. Each block prefetches the
// next block's weight rows: the hardware prefetcher restarts on every row, and without it compute
// and memory did not overlap (4-16 rows ran at 12-16 GB/s instead of ~20). More rows than
// kMaxRows* (compute-bound: a GEMM's blocking wins), other dtypes, layouts or CPUs without AVX512
// call ATen. Figures: tools/bench/bench_kernels.py --ops linear.
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "xllm_avx512.h"
#include "xllm_ops.h"

namespace {

// Up to this many rows the kernel beats ATen (bench_kernels --ops linear, SmolLM2 and Qwen2.5
// weights): fp32 0.47-0.84x ATen's time at 4-32 rows (0.8-0.98x at 48-64, so left to ATen);
// bf16 0.45-0.95x at 1-8 rows, then compute-bound (1.0-2.5x at 12-32: ATen's bf16 GEMM does
// more work per byte than vdpbf16ps at one instruction a cycle).
constexpr int64_t kMaxRowsF32 = 32;
constexpr int64_t kMaxRowsBF16 = 8;
// Weight elements per parallel task: ~10 us of streaming at ~20 GB/s.
constexpr int64_t kGrainElems = 1 << 16;

#ifdef XLLM_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
using xllm_avx512::load16;
using xllm_avx512::prefetch4;
using xllm_avx512::reduce16;

// acc_out[m][n] = the sum of acc[m][n]'s lanes, always through the same tree (missing slots of a
// tail block are zeros): a row's result must not depend on how many rows share its block, or
// padding a batch to its bucket would change real rows' logits in the last bits.
template <int NB, int MB>
inline void reduce_block(__m512 (&acc)[MB][NB], float (*acc_out)[4]) {
  __m512 all[16];
#pragma GCC unroll 4
  for (int m = 0; m < 4; ++m)
#pragma GCC unroll 4
    for (int n = 0; n < 4; ++n)
      all[4 * m + n] = (m < MB && n < NB) ? acc[m < MB ? m : 0][n < NB ? n : 0]
                                          : _mm512_setzero_ps();
  alignas(64) float sums[16];
  _mm512_store_ps(sums, reduce16(all));
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
    for (int n = 0; n < NB; ++n) acc_out[m][n] = sums[4 * m + n];
}

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,avx512bf16")
// DotBF16's block (see below), compiled for AVX512_BF16 apart from the rest.
template <int NB, int MB>
void dot_bf16_block(const c10::BFloat16* x, int64_t K, const c10::BFloat16* w,
                    const c10::BFloat16* next, float (*acc_out)[4]) {
  __m512 acc[MB][NB];
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
    for (int n = 0; n < NB; ++n) acc[m][n] = _mm512_setzero_ps();
  auto step = [&](int64_t k, __mmask32 mask) __attribute__((always_inline)) {
    __m512bh wv[NB];
#pragma GCC unroll 4
    for (int n = 0; n < NB; ++n) wv[n] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + n * K + k);
    prefetch4(next, K, k);
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k);
#pragma GCC unroll 4
      for (int n = 0; n < NB; ++n) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], xv, wv[n]);
    }
  };
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) step(k, ~__mmask32(0));
  if (k < K) step(k, __mmask32((1ull << (K - k)) - 1));
  reduce_block<NB, MB>(acc, acc_out);
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
// How a block of NB weight rows times MB activation rows is computed: acc_out[m][n] =
// sum_k x[m][k] * w[n][k]. The loops over m and n must unroll completely for the accumulators to
// stay in registers. `next` (or null): the following block's weight rows, prefetched meanwhile
// so that memory streams while this block computes (the hardware prefetcher restarts on every
// row). Widen<W>: activations widened to fp32 once per call, weights (fp32, or bf16 shifted into
// fp32) in registers, fp32 FMAs: any AVX512 CPU.
template <typename W>
struct Widen {
  using X = float;
  using Wt = W;
  template <int NB, int MB>
  static void block(const X* x, int64_t K, const W* w, const W* next, float (*acc_out)[4]) {
    __m512 acc[MB][NB];
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
      for (int n = 0; n < NB; ++n) acc[m][n] = _mm512_setzero_ps();
    auto step = [&](int64_t k, __mmask16 mask) __attribute__((always_inline)) {
      __m512 wv[NB];
#pragma GCC unroll 4
      for (int n = 0; n < NB; ++n) wv[n] = load16(w + n * K + k, mask);
      prefetch4(next, K, k);
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) {
        const __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * K + k);
#pragma GCC unroll 4
        for (int n = 0; n < NB; ++n) acc[m][n] = _mm512_fmadd_ps(xv, wv[n], acc[m][n]);
      }
    };
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) step(k, __mmask16(0xFFFF));
    if (k < K) step(k, __mmask16((1u << (K - k)) - 1));
    reduce_block<NB, MB>(acc, acc_out);
  }
};

// DotBF16: bf16 activations and weights as they are, vdpbf16ps (32 products per instruction,
// fp32 sums): half the instructions of Widen<bf16>, on CPUs with AVX512_BF16. Its block is
// compiled for that ISA apart (above) and only ever called where the CPU has it.
struct DotBF16 {
  using X = c10::BFloat16;
  using Wt = c10::BFloat16;
  template <int NB, int MB>
  static void block(const X* x, int64_t K, const Wt* w, const Wt* next, float (*acc_out)[4]) {
    dot_bf16_block<NB, MB>(x, K, w, next, acc_out);
  }
};

template <typename P, int NB>
inline void rows_block(const typename P::X* x, int64_t M, int64_t K, const typename P::Wt* w,
                       const typename P::Wt* next, float (*acc)[4], int64_t m0) {
  const typename P::X* xm = x + m0 * K;
  next = m0 == 0 ? next : nullptr;  // the first pass over the block streams it in
  switch (std::min<int64_t>(M - m0, 4)) {
    case 4: P::template block<NB, 4>(xm, K, w, next, acc); break;
    case 3: P::template block<NB, 3>(xm, K, w, next, acc); break;
    case 2: P::template block<NB, 2>(xm, K, w, next, acc); break;
    default: P::template block<NB, 1>(xm, K, w, next, acc); break;
  }
}

// Weight rows [n0, n1) for every activation row: NB = 4 weight rows at a time, 1 at the tail.
template <typename P, typename O>
void linear_rows(const typename P::X* x, int64_t M, int64_t K, const typename P::Wt* w,
                 const O* bias, O* out, int64_t N, int64_t n0, int64_t n1) {
  float acc[4][4];
  auto emit = [&](int64_t m0, int64_t n, int nb) {
    for (int m = 0; m < 4 && m0 + m < M; ++m)
      for (int j = 0; j < nb; ++j) {
        float v = acc[m][j] + (bias ? static_cast<float>(bias[n + j]) : 0.f);
        out[(m0 + m) * N + n + j] = static_cast<O>(v);
      }
  };
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const typename P::Wt* next = n + 8 <= n1 ? w + (n + 4) * K : nullptr;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      rows_block<P, 4>(x, M, K, w + n * K, next, acc, m0);
      emit(m0, n, 4);
    }
  }
  for (; n < n1; ++n)
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      rows_block<P, 1>(x, M, K, w + n * K, nullptr, acc, m0);
      emit(m0, n, 1);
    }
}

template <typename P, typename T>
void linear_small(const at::Tensor& x2, const at::Tensor& w, const at::Tensor* b,
                  at::Tensor& out2) {
  const int64_t M = x2.size(0), K = x2.size(1), N = w.size(0);
  constexpr auto xtype = std::is_same_v<typename P::X, float> ? at::kFloat : at::kBFloat16;
  at::Tensor xc = x2.to(xtype).contiguous();  // the few activation rows, once per call
  const auto* x = xc.const_data_ptr<typename P::X>();
  const auto* wp = w.const_data_ptr<typename P::Wt>();
  const T* bp = b ? b->const_data_ptr<T>() : nullptr;
  T* op = out2.data_ptr<T>();
  const int64_t blocks = (N + 3) / 4;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(4 * K, 1));
  xllm_parallel_for(blocks, grain, [&](int64_t b0, int64_t b1) {
    linear_rows<P, T>(x, M, K, wp, bp, op, N, 4 * b0, std::min(N, 4 * b1));
  });
}

#pragma GCC pop_options

#endif

bool has_avx512_bf16() {
#ifdef XLLM_AVX512
  static const bool yes = __builtin_cpu_supports("avx512bf16");
  return yes;
#else
  return false;
#endif
}

// Whether the streaming kernel takes this call: AVX512, fp32 or bf16 throughout, a contiguous
// 2-D weight, rows contiguous in the last dim, at most kMaxRows rows (and, given one, an `out`
// of the dtype, contiguous).
bool takes(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
           const at::Tensor* out = nullptr) {
#ifdef XLLM_AVX512
  const auto dt = x.scalar_type();
  if (!xllm_use_avx512() || (dt != at::kFloat && dt != at::kBFloat16)) return false;
  if (out && (out->scalar_type() != dt || !out->is_contiguous())) return false;
  if (w.scalar_type() != dt || w.dim() != 2 || !w.is_contiguous()) return false;
  if (x.dim() < 1 || x.size(-1) != w.size(1) || x.size(-1) == 0) return false;
  const int64_t rows = x.size(-1) ? x.numel() / x.size(-1) : 0;
  if (rows == 0 || rows > (dt == at::kFloat ? kMaxRowsF32 : kMaxRowsBF16)) return false;
  if (b && (b->scalar_type() != dt || b->dim() != 1 || !b->is_contiguous() || b->size(0) != w.size(0)))
    return false;
  return true;
#else
  return false;
#endif
}

std::vector<int64_t> out_shape(const at::Tensor& x, const at::Tensor& w) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = w.size(0);
  return shape;
}

at::Tensor& linear_out(const at::Tensor& x, const at::Tensor& w,
                       const std::optional<at::Tensor>& b, at::Tensor& out) {
  const auto shape = out_shape(x, w);
  if (out.sizes() != at::IntArrayRef(shape)) out.resize_(shape);
  if (!takes(x, w, b, &out)) {
    if (x.scalar_type() != at::kFloat) return at::linear_out(out, x, w, b);
    out.copy_(xllm_dense_linear(x, w, b));  // prefill sizes: the GEMM dwarfs the copy
    return out;
  }
#ifdef XLLM_AVX512
  const int64_t K = x.size(-1);
  at::Tensor x2 = x.reshape({-1, K});
  at::Tensor out2 = out.view({-1, w.size(0)});
  const at::Tensor* bp = b ? &*b : nullptr;
  if (x.scalar_type() == at::kFloat) {
    linear_small<Widen<float>, float>(x2, w, bp, out2);
  } else if (has_avx512_bf16()) {
    linear_small<DotBF16, c10::BFloat16>(x2, w, bp, out2);
  } else {
    linear_small<Widen<c10::BFloat16>, c10::BFloat16>(x2, w, bp, out2);
  }
#endif
  return out;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  if (!takes(x, w, b)) return xllm_dense_linear(x, w, b);  // prefill sizes: no output made here first
  at::Tensor out = at::empty(out_shape(x, w), x.options());
  return linear_out(x, w, b, out);
}

}  // namespace

namespace xllm_direct {  // xllm_ops.h

at::Tensor& linear_out(const at::Tensor& x, const at::Tensor& w,
                       const std::optional<at::Tensor>& b, at::Tensor& out) {
  return ::linear_out(x, w, b, out);
}

}  // namespace xllm_direct

TORCH_LIBRARY_IMPL(xllm, CPU, m) {
  m.impl("linear", &linear);
  m.impl("linear.out", &linear_out);
}
