// CPU kernels of the fused xllm:: ops, registered for the CPU dispatch key (they take over from
// the Python reference implementations once this library is loaded; see kernels/cpu/__init__.py).
// Each kernel rounds where the unfused ATen sequence rounds (activation dtype T, statistics and
// activations in fp32), so it matches the reference to within fp32 reduction order. Unusual
// inputs (mixed dtypes, double, odd layouts) take an ATen composite path with the reference
// semantics. Figures: tools/bench/bench_kernels.py.
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <ATen/Version.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "xllm_cpu_vec.h"
#include "xllm_ops.h"
#include "xllm_pool.h"

namespace {

// Runs f(begin, end) over [0, rows) in chunks of at least `grain` rows on ATen's intra-op
// threads (outside the AVX512 section below: every CPU runs it, through xllm_parallel_for; in
// the section GCC used 512-bit moves for its copies, an illegal instruction on AVX2 CPUs). at::parallel_for is a header template over `omp parallel`, serial in a build without
// -fopenmp (the JIT build's flags); TensorIterator::for_each runs it inside libtorch instead.
// The iterator over `rows` bytes (one per row: a chunk's offset is its start), built once per
// thread and row count: building it and its tensor cost ~3-5 us, paid by every parallel call
// (121 matmuls a SmolLM2 decode step).
inline at::TensorIterator& rows_iterator(int64_t rows) {
  thread_local std::unordered_map<int64_t, std::unique_ptr<at::TensorIterator>> cache;
  auto& it = cache[rows];
  if (!it) {
    const at::Tensor index = at::empty({rows}, at::kByte);  // owned by the iterator from here
    it = std::make_unique<at::TensorIterator>(at::TensorIteratorConfig()
                                                  .add_output(index)
                                                  .resize_outputs(false)
                                                  .check_all_same_dtype(false)
                                                  .build());
  }
  return *it;
}

template <typename F>
void parallel_rows(int64_t rows, int64_t grain, const F& f) {
#ifdef INTRA_OP_PARALLEL
  at::parallel_for(0, rows, grain, f);
#else
  if (rows <= grain || at::get_num_threads() == 1 || at::in_parallel_region()) {
    f(0, rows);
    return;
  }
  at::TensorIterator& iter = rows_iterator(rows);
  const char* base = static_cast<const char*>(iter.data_ptr(0));
  auto loop = [&](char** data, const int64_t*, int64_t n, int64_t) {
    f(data[0] - base, data[0] - base + n);
  };
  iter.for_each(loop, grain);
#endif
}

}  // namespace

// The fused loops are written with at::vec::Vectorized<float>. A plain JIT build (-O3, no -m
// flags) would get its generic scalar fallback, so on x86-64 GCC this section is compiled for
// ATen's AVX512 set, in a namespace of its own (no inline symbol shared with libtorch's builds),
// and runs only where ATen itself picked AVX512; where it picked AVX2 the same loops run from
// xllm_cpu_avx2.cpp (use_vec()); elsewhere the ATen composites run. A build that defines
// CPU_CAPABILITY_* itself, and other targets (aarch64: NEON), take what the build gives.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
#define XLLM_AVX512_SECTION 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#pragma GCC optimize("fp-contract=off")  // round each mul as ATen does (explicit fmadd aside)
#define CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY xllm_avx512
// HACK(jit-flags): `#pragma GCC target` does not define the ISA macros sleef.h (included by the
// vec headers) tests to declare its AVX512 functions: defined for this section only. Remove the
// section when kernels/cpu/__init__.py builds with the runtime capability's -m/-D flags.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

// Defined in xllm_decode_attention.cpp.
bool xllm_decode_attention(const at::Tensor& q, const at::Tensor& cache, const int64_t* slot,
                           const int64_t* slen, int64_t window, double scale, at::Tensor& out);

namespace {
namespace vec {
#include "xllm_cpu_vec.inc"
}  // namespace vec
}  // namespace

#ifdef XLLM_AVX512_SECTION
#undef __AVX__
#undef __AVX2__
#undef __FMA__
#undef __F16C__
#undef __AVX512F__
#undef __AVX512BW__
#undef __AVX512VL__
#undef __AVX512DQ__
#pragma GCC pop_options
#endif

namespace {

// Each parallel task gets at least this many elements: on 2 threads the fork/join (~5 us) pays
// off from ~10 us of work, which is ~16k elements of silu (0.5-0.8 ns each), ~32k of the norms
// and rotary (0.2-0.5 ns each). So norms and rotary of up to 32 tokens at hidden 896 run on one
// thread, silu_and_mul from 4 tokens at intermediate 4864 on two.
constexpr int64_t kGrainSilu = 1 << 14;
constexpr int64_t kGrainRows = 1 << 15;

// Whether the AVX512 section runs: where ATen itself picked AVX512.
bool vec_avx512() {
#if defined(XLLM_AVX512_SECTION)
  static const bool yes = at::get_cpu_capability() == "AVX512";
  return yes;
#else
  return false;
#endif
}

// Whether the vectorized loops run (see the vec section): with a generic (scalar) at::vec on
// x86 ATen's own kernels are faster; the AVX512 section needs an AVX512 CPU, the AVX2 build
// (xllm_cpu_avx2.cpp) an AVX2 one.
bool use_vec() {
#if defined(XLLM_AVX512_SECTION)
  static const bool yes = vec_avx512() || at::get_cpu_capability() == "AVX2";
  return yes;
#elif defined(__x86_64__) && !defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
  return false;
#else
  return true;
#endif
}

// Rows of `row` elements per parallel task.
int64_t grain(int64_t grain_elems, int64_t row) {
  return std::max<int64_t>(1, grain_elems / std::max<int64_t>(row, 1));
}

// The vectorized loops of the capability ATen picked (use_vec() holds): the AVX512 section's, or
// the AVX2 build's.
template <typename T>
void rms_rows(const T* x, const T* res, const T* w, T* out, T* res_out, int64_t rows, int64_t d,
              float eps, int64_t grain) {
#if defined(XLLM_AVX512_SECTION)
  if (!vec_avx512()) return xllm_avx2_rms_rows<T>(x, res, w, out, res_out, rows, d, eps, grain);
#endif
  vec::rms_rows<T>(x, res, w, out, res_out, rows, d, eps, grain);
}

template <typename T>
void silu_mul_rows(const T* g, int64_t gs, const T* u, int64_t us, T* out, int64_t rows,
                   int64_t n, int64_t grain) {
#if defined(XLLM_AVX512_SECTION)
  if (!vec_avx512()) return xllm_avx2_silu_mul_rows<T>(g, gs, u, us, out, rows, n, grain);
#endif
  vec::silu_mul_rows<T>(g, gs, u, us, out, rows, n, grain);
}

template <typename T>
void rotary_tokens(const XllmHeads<T>& q, const XllmHeads<T>& k, const T* cos, const T* sin,
                   int64_t cs_stride, int64_t width, int64_t tokens, int64_t d, bool is_neox,
                   int64_t grain) {
#if defined(XLLM_AVX512_SECTION)
  if (!vec_avx512())
    return xllm_avx2_rotary_tokens<T>(q, k, cos, sin, cs_stride, width, tokens, d, is_neox, grain);
#endif
  vec::rotary_tokens<T>(vec::Heads<T>{q.x, q.out, q.heads, q.stride_t, q.stride_h},
                        vec::Heads<T>{k.x, k.out, k.heads, k.stride_t, k.stride_h}, cos, sin,
                        cs_stride, width, tokens, d, is_neox, grain);
}

// Calls f(T{}) for the dtypes the vectorized loops take (fp32 compute); false for the others.
template <typename F>
bool dispatch_vec(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kFloat:
      f(float{});
      return true;
    case at::kBFloat16:
      f(at::BFloat16{});
      return true;
    case at::kHalf:
      f(at::Half{});
      return true;
    default:
      return false;
  }
}

at::Tensor rms_norm_composite(const at::Tensor& x, const at::Tensor& w, double eps) {
  auto x32 = x.to(at::kFloat);
  auto var = x32.pow(2).mean(-1, true);
  return w * (x32 * at::rsqrt(var + eps)).to(x.scalar_type());
}

bool plain(const at::Tensor& x, const at::Tensor& w) {
  return x.scalar_type() == w.scalar_type() && w.dim() == 1 && x.dim() >= 1 &&
         w.size(0) == x.size(-1) && x.size(-1) > 0 && use_vec();
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  if (!plain(x, w)) return rms_norm_composite(x, w, eps);
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto out = at::empty_like(xc);
  const int64_t d = x.size(-1);
  const bool done = dispatch_vec(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    rms_rows<T>(xc.data_ptr<T>(), nullptr, wc.data_ptr<T>(), out.data_ptr<T>(), nullptr,
                     xc.numel() / d, d, eps, grain(kGrainRows, d));
  });
  return done ? out : rms_norm_composite(x, w, eps);
}

std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x, const at::Tensor& res,
                                                      const at::Tensor& w, double eps) {
  if (!plain(x, w) || res.sizes() != x.sizes() || res.scalar_type() != x.scalar_type() ||
      x.scalar_type() == at::kDouble) {
    auto new_res = x + res;
    return {rms_norm_composite(new_res, w, eps), new_res};
  }
  auto xc = x.contiguous();
  auto rc = res.contiguous();
  auto wc = w.contiguous();
  auto out = at::empty_like(xc);
  auto res_out = at::empty_like(xc);
  const int64_t d = x.size(-1);
  dispatch_vec(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    rms_rows<T>(xc.data_ptr<T>(), rc.data_ptr<T>(), wc.data_ptr<T>(), out.data_ptr<T>(),
                     res_out.data_ptr<T>(), xc.numel() / d, d, eps, grain(kGrainRows, d));
  });
  return {out, res_out};
}

// gate and up are usually the two halves of the merged gate_up matmul: [T, I] views with row
// stride 2I, read in place.
at::Tensor silu_and_mul(const at::Tensor& gate, const at::Tensor& up) {
  const auto dtype = gate.scalar_type();
  if (gate.sizes() != up.sizes() || up.scalar_type() != dtype || gate.dim() == 0 ||
      gate.numel() == 0 || dtype == at::kDouble || !use_vec()) {
    return at::silu(gate) * up;
  }
  const int64_t n = gate.size(-1);
  // [rows, n]: a view whenever the leading dims allow one (2-D: as it is, saving ~0.1 us each)
  auto g = gate.dim() == 2 ? gate : gate.reshape({-1, n});
  auto u = up.dim() == 2 ? up : up.reshape({-1, n});
  if (g.stride(1) != 1) g = g.contiguous();
  if (u.stride(1) != 1) u = u.contiguous();
  auto out = at::empty(gate.sizes(), gate.options());
  const bool done = dispatch_vec(dtype, [&](auto tag) {
    using T = decltype(tag);
    silu_mul_rows<T>(g.data_ptr<T>(), g.stride(0), u.data_ptr<T>(), u.stride(0),
                          out.data_ptr<T>(), g.size(0), n, grain(kGrainSilu, n));
  });
  return done ? out : at::silu(gate) * up;
}

// Tables of width D/2 hold one angle per rotated pair: widen them to D the way the pairs lie
// (any other width, D or 1, broadcasts as it is).
at::Tensor widen(const at::Tensor& table, int64_t d, bool is_neox) {
  if (d % 2 != 0 || table.size(-1) != d / 2) return table;
  return is_neox ? at::cat({table, table}, -1) : at::stack({table, table}, -1).flatten(-2);
}

// x * cos + rotate(x) * sin; rotate-half (is_neox) or interleaved (GPT-J) pairs.
at::Tensor rotate_composite(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                            bool is_neox) {
  const int64_t d = x.size(-1), half = d / 2;
  auto rot = is_neox ? at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1)
                     : at::stack({-x.slice(-1, 1, d, 2), x.slice(-1, 0, d, 2)}, -1).flatten(-2);
  return x * widen(cos, d, is_neox) + rot * widen(sin, d, is_neox);
}

// q [T, H, D] and k [T, Hkv, D] with unit inner strides (views of the merged qkv output) and
// [T, 1, D or D/2] tables, all of one dtype.
bool rotary_plain(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                  const at::Tensor& sin) {
  const auto dtype = q.scalar_type();
  if (q.dim() != 3 || k.dim() != 3 || cos.dim() != 3 || k.scalar_type() != dtype ||
      cos.scalar_type() != dtype || sin.scalar_type() != dtype || dtype == at::kDouble) {
    return false;
  }
  const int64_t tokens = q.size(0), d = q.size(2);
  return d > 0 && d % 2 == 0 && k.size(0) == tokens && k.size(2) == d && q.stride(2) == 1 &&
         k.stride(2) == 1 && cos.sizes() == sin.sizes() && cos.size(0) == tokens &&
         cos.size(1) == 1 && (cos.size(2) == d || cos.size(2) == d / 2) &&
         use_vec();
}

std::tuple<at::Tensor, at::Tensor> rotary_embedding(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& cos, const at::Tensor& sin,
                                                    bool is_neox) {
  if (!rotary_plain(q, k, cos, sin)) {
    return {rotate_composite(q, cos, sin, is_neox), rotate_composite(k, cos, sin, is_neox)};
  }
  auto c = cos.contiguous();
  auto s = sin.contiguous();
  auto q_out = at::empty(q.sizes(), q.options());
  auto k_out = at::empty(k.sizes(), k.options());
  const int64_t tokens = q.size(0), d = q.size(2), width = c.size(2);
  dispatch_vec(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const XllmHeads<T> qh{q.data_ptr<T>(), q_out.data_ptr<T>(), q.size(1), q.stride(0), q.stride(1)};
    const XllmHeads<T> kh{k.data_ptr<T>(), k_out.data_ptr<T>(), k.size(1), k.stride(0), k.stride(1)};
    rotary_tokens<T>(qh, kh, c.data_ptr<T>(), s.data_ptr<T>(), width, width, tokens, d,
                          is_neox, grain(kGrainRows, (q.size(1) + k.size(1)) * d));
  });
  return {q_out, k_out};
}

// xllm::store_kv: this step's K/V into the cache at (slot, position), in place.
// The decode-sized store as plain row copies (one memcpy per token for K and for V, ~0.1 us
// against ~5 us for a strided Tensor::copy_) where the rows are contiguous, of the cache's dtype
// and in range; false (nothing written) otherwise.
bool store_rows_raw(const at::Tensor& cache, const at::Tensor& k, const at::Tensor& v,
                    const int64_t* slot, const int64_t* pos) {
  const auto dt = cache.scalar_type();
  const int64_t heads = cache.size(3), d = cache.size(4), n = k.size(0);
  if (k.scalar_type() != dt || v.scalar_type() != dt) return false;
  if (k.dim() != 3 || k.size(1) != heads || k.size(2) != d || v.sizes() != k.sizes()) return false;
  // each token's [heads, d] block contiguous (tokens may be apart: views of the merged qkv)
  for (const auto* x : {&k, &v})
    if (x->stride(2) != 1 || x->stride(1) != d) return false;
  if (cache.stride(4) != 1 || cache.stride(3) != d) return false;
  for (int64_t t = 0; t < n; ++t)
    if (slot[t] < 0 || slot[t] >= cache.size(1) || pos[t] < 0 || pos[t] >= cache.size(2))
      return false;
  const int64_t elem = cache.element_size(), bytes = heads * d * elem;
  const int64_t k_step = k.stride(0) * elem, v_step = v.stride(0) * elem;
  char* base = static_cast<char*>(cache.data_ptr());
  const char* kp = static_cast<const char*>(k.const_data_ptr());
  const char* vp = static_cast<const char*>(v.const_data_ptr());
  for (int64_t t = 0; t < n; ++t) {
    char* row = base + (slot[t] * cache.stride(1) + pos[t] * cache.stride(2)) * elem;
    std::memcpy(row, kp + t * k_step, bytes);
    std::memcpy(row + cache.stride(0) * elem, vp + t * v_step, bytes);
  }
  return true;
}

void store_kv(at::Tensor kv_cache, int64_t layer, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& token_slots, const at::Tensor& positions) {
  auto cache = kv_cache.select(0, layer);  // [2, S, M, Hkv, D]
  if (k.size(0) <= 16 && token_slots.scalar_type() == at::kLong &&
      positions.scalar_type() == at::kLong && token_slots.is_contiguous() &&
      positions.is_contiguous()) {
    // decode-sized steps: a row copy per token beats index_put_ on the strided (token-major,
    // page-mapped) cache view
    const int64_t* slot = token_slots.data_ptr<int64_t>();
    const int64_t* pos = positions.data_ptr<int64_t>();
    if (store_rows_raw(cache, k, v, slot, pos)) return;
    for (int64_t t = 0; t < k.size(0); ++t) {
      cache.select(0, 0).select(0, slot[t]).select(0, pos[t]).copy_(k.select(0, t));
      cache.select(0, 1).select(0, slot[t]).select(0, pos[t]).copy_(v.select(0, t));
    }
    return;
  }
  c10::List<std::optional<at::Tensor>> index;
  index.push_back(token_slots);
  index.push_back(positions);
  cache.select(0, 0).index_put_(index, k.to(kv_cache.scalar_type()));
  cache.select(0, 1).index_put_(index, v.to(kv_cache.scalar_type()));
}

// xllm::attention: one SDPA per sequence over its own KV prefix, a slice of its slot (no gather,
// so pages it does not own are never read). A decode row needs no mask: its window, if any, is
// the slice's start. Same math as kernels/attention.py, without Python between the ATen calls.
// xllm::attention.out: the same into `out` (the activation arena's [T, H, D] buffer, so that the
// reshape after it is a view of fixed memory that a CPU graph makes once).
at::Tensor& attention_out(const at::Tensor& q, const at::Tensor& kv_cache, int64_t layer,
                          const at::Tensor& positions, const at::Tensor& seq_slots,
                          const at::Tensor& query_lens, const at::Tensor& seq_lens, double scale,
                          int64_t window, at::Tensor& out) {
  TORCH_CHECK(out.scalar_type() == q.scalar_type(), "xllm::attention.out: out is ",
              out.scalar_type(), ", q ", q.scalar_type());
  if (out.sizes() != q.sizes()) out.resize_(q.sizes());
  auto cache = kv_cache.select(0, layer);  // [2, S, M, Hkv, D]
  auto slots = seq_slots.to(at::kLong).contiguous();
  auto qlens = query_lens.to(at::kLong).contiguous();
  auto slens = seq_lens.to(at::kLong).contiguous();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t* qlen = qlens.data_ptr<int64_t>();
  const int64_t* slen = slens.data_ptr<int64_t>();
  const bool gqa = q.size(1) != cache.size(3);
  const int64_t B = slots.size(0);
  if (q.size(0) == B && std::all_of(qlen, qlen + B, [](int64_t n) { return n == 1; }) &&
      xllm_decode_attention(q, cache, slot, slen, window, scale, out)) {
    return out;  // a decode step: every sequence at once, from the cache rows in place
  }
  auto positions64 = positions.to(at::kLong).contiguous();
  const int64_t* pos = positions64.data_ptr<int64_t>();
  int64_t start = 0;
  for (int64_t b = 0; b < slots.size(0); ++b) {
    const int64_t n = qlen[b], len = slen[b];
    const int64_t lo = (n == 1 && window > 0) ? std::max<int64_t>(0, len - window) : 0;
    auto k = cache.select(0, 0).select(0, slot[b]).slice(0, lo, len).transpose(0, 1);
    auto v = cache.select(0, 1).select(0, slot[b]).slice(0, lo, len).transpose(0, 1);
    auto qb = q.slice(0, start, start + n).transpose(0, 1).unsqueeze(0);  // [1, H, n, D]
    std::optional<at::Tensor> mask;
    // a whole prompt at positions 0..n-1 (no cached prefix, no window): SDPA's own causal mask,
    // the same one, on its flash kernel's causal path (it skips the masked blocks: 22% less time
    // than with the mask given as a tensor, SDPA alone at 512 tokens, SmolLM2's shapes, 2 threads)
    bool whole = n > 1 && n == len && lo == 0 && window <= 0;
    for (int64_t i = 0; whole && i < n; ++i) whole = pos[start + i] == i;
    if (n > 1 && !whole) {  // prefill: causal (and windowed) by position
      auto k_pos = at::arange(lo, len, positions.options());
      auto q_pos = positions.slice(0, start, start + n).unsqueeze(1);
      auto m = k_pos.unsqueeze(0) <= q_pos;
      if (window > 0) m = m & (k_pos.unsqueeze(0) > q_pos - window);
      mask = m;
    }
    auto o = at::scaled_dot_product_attention(qb, k.unsqueeze(0).contiguous(),
                                              v.unsqueeze(0).contiguous(), mask, 0.0, whole,
                                              scale, gqa);  // [1, H, n, D]
    out.slice(0, start, start + n).copy_(o.squeeze(0).transpose(0, 1));
    start += n;
  }
  return out;
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& kv_cache, int64_t layer,
                     const at::Tensor& positions, const at::Tensor& seq_slots,
                     const at::Tensor& query_lens, const at::Tensor& seq_lens, double scale,
                     int64_t window) {
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  return attention_out(q, kv_cache, layer, positions, seq_slots, query_lens, seq_lens, scale,
                       window, out);
}

}  // namespace

namespace xllm_direct {  // xllm_ops.h

at::Tensor& attention_out(const at::Tensor& q, const at::Tensor& kv_cache, int64_t layer,
                          const at::Tensor& positions, const at::Tensor& seq_slots,
                          const at::Tensor& query_lens, const at::Tensor& seq_lens, double scale,
                          int64_t window, at::Tensor& out) {
  return ::attention_out(q, kv_cache, layer, positions, seq_slots, query_lens, seq_lens, scale,
                         window, out);
}
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  return ::rms_norm(x, w, eps);
}
std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x, const at::Tensor& res,
                                                      const at::Tensor& w, double eps) {
  return ::fused_add_rms_norm(x, res, w, eps);
}
at::Tensor silu_and_mul(const at::Tensor& gate, const at::Tensor& up) {
  return ::silu_and_mul(gate, up);
}
std::tuple<at::Tensor, at::Tensor> rotary_embedding(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& cos, const at::Tensor& sin,
                                                    bool is_neox) {
  return ::rotary_embedding(q, k, cos, sin, is_neox);
}
void store_kv(at::Tensor kv_cache, int64_t layer, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& token_slots, const at::Tensor& positions) {
  ::store_kv(std::move(kv_cache), layer, k, v, token_slots, positions);
}

}  // namespace xllm_direct

// For the other kernel files of this library (xllm_linear.cpp).
void xllm_parallel_for(int64_t n, int64_t grain,
                       const std::function<void(int64_t, int64_t)>& f) {
  if (xllm_pool_for(n, grain, f)) return;  // inside a CpuProgram replay: its threads
  parallel_rows(n, grain, f);
}

// fp32 GEMMs of prefill sizes go to oneDNN's matmul where torch has it (mkldnn::_linear_pointwise,
// the op Inductor's CPU backend calls): ATen's fp32 linear takes MKL's sgemm, which on AMD CPUs
// runs its AVX2 code (measured on a 2-core Zen 5, M = 128, K = 576: 133-156 GFLOP/s against
// oneDNN's 315-354; both fp32 arithmetic, sums in another order). XLLM_DENSE_GEMM=aten keeps
// ATen's. Other dtypes and shapes take at::linear (bf16 already goes to oneDNN there).
at::Tensor xllm_dense_linear(const at::Tensor& x, const at::Tensor& w,
                             const std::optional<at::Tensor>& b) {
  static const std::optional<c10::OperatorHandle> onednn = []() -> std::optional<c10::OperatorHandle> {
    if (std::string_view(std::getenv("XLLM_DENSE_GEMM") ?: "") == "aten") return std::nullopt;
    return c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  }();
  const bool fp32 = x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat &&
                    (!b || b->scalar_type() == at::kFloat);
  if (!onednn || !fp32 || x.dim() < 1 || x.numel() == 0 || w.dim() != 2 || !w.is_contiguous())
    return at::linear(x, w, b);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = w.size(0);
  torch::jit::Stack stack{x.reshape({-1, x.size(-1)}).contiguous(), w,
                          b ? c10::IValue(b->contiguous()) : c10::IValue(), std::string("none"),
                          c10::List<std::optional<at::Scalar>>(), c10::IValue()};
  onednn->callBoxed(&stack);
  return stack.back().toTensor().view(shape);
}

bool xllm_use_avx512() {
#if defined(XLLM_AVX512_SECTION)
  return vec_avx512();
#else
  return false;
#endif
}

TORCH_LIBRARY_IMPL(xllm, CPU, m) {
  m.impl("store_kv", &store_kv);
  m.impl("attention", &attention);
  m.impl("attention.out", &attention_out);
  m.impl("rms_norm", &rms_norm);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rotary_embedding", &rotary_embedding);
}

