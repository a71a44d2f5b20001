// CPU kernels of the fused xllm:: ops, registered for the CPU dispatch key (they take over from
// the Python reference implementations once this library is loaded; see kernels/cpu/__init__.py).
// Each kernel rounds where the unfused ATen sequence rounds (activation dtype T, statistics in
// fp32), so it matches the reference to within fp32 reduction order. Unusual inputs (mixed
// dtypes, odd layouts) take an ATen composite path with the reference semantics.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>

namespace {

// Rows of at most this many elements are grouped per parallel task: decode (T=1..8) stays on
// one thread, where a fork/join would cost more than the work.
constexpr int64_t kGrainElems = 1 << 14;

// Above this many elements the scalar loops below lose to ATen's vectorized kernels (measured:
// rms_norm 2x slower at [128, 896]), so large (prefill) inputs take the ATen composite path,
// still without the Python dispatch per op. Decode sizes ([1..8, 896]) win 2-5x.
constexpr int64_t kMaxDirectElems = 1 << 15;

int64_t grain(int64_t row) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(row, 1)); }

at::Tensor rms_norm_composite(const at::Tensor& x, const at::Tensor& w, double eps) {
  auto x32 = x.to(at::kFloat);
  auto var = x32.pow(2).mean(-1, true);
  return w * (x32 * at::rsqrt(var + eps)).to(x.scalar_type());
}

bool plain(const at::Tensor& x, const at::Tensor& w) {
  return x.scalar_type() == w.scalar_type() && w.dim() == 1 && x.dim() >= 1 &&
         w.size(0) == x.size(-1) && x.size(-1) > 0;
}

// y = w * T(x * rsqrt(mean(x^2) + eps)), x read in fp32; `res` (optional) is added first and the
// sum (rounded to T, as the model's add rounds it) is written to `res_out`.
template <typename T>
void rms_rows(const T* x, const T* res, const T* w, T* out, T* res_out, int64_t rows, int64_t d,
              float eps) {
  at::parallel_for(0, rows, grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * d;
      T* o = out + r * d;
      float acc = 0.f;
      if (res != nullptr) {
        const T* rr = res + r * d;
        T* ro = res_out + r * d;
        for (int64_t i = 0; i < d; ++i) {
          ro[i] = static_cast<T>(static_cast<float>(xr[i]) + static_cast<float>(rr[i]));
          float v = static_cast<float>(ro[i]);
          acc += v * v;
        }
        xr = ro;
      } else {
        for (int64_t i = 0; i < d; ++i) {
          float v = static_cast<float>(xr[i]);
          acc += v * v;
        }
      }
      const float inv = 1.f / std::sqrt(acc / static_cast<float>(d) + eps);
      for (int64_t i = 0; i < d; ++i) {
        T normed = static_cast<T>(static_cast<float>(xr[i]) * inv);
        o[i] = static_cast<T>(static_cast<float>(w[i]) * static_cast<float>(normed));
      }
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  if (!plain(x, w) || x.numel() > kMaxDirectElems) return rms_norm_composite(x, w, eps);
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto out = at::empty_like(xc);
  const int64_t d = x.size(-1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_rows<scalar_t>(xc.data_ptr<scalar_t>(), nullptr, wc.data_ptr<scalar_t>(),
                       out.data_ptr<scalar_t>(), nullptr, xc.numel() / d, d, eps);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x, const at::Tensor& res,
                                                      const at::Tensor& w, double eps) {
  if (!plain(x, w) || res.sizes() != x.sizes() || res.scalar_type() != x.scalar_type() ||
      x.numel() > kMaxDirectElems) {
    auto new_res = x + res;
    return {rms_norm_composite(new_res, w, eps), new_res};
  }
  auto xc = x.contiguous();
  auto rc = res.contiguous();
  auto wc = w.contiguous();
  auto out = at::empty_like(xc);
  auto res_out = at::empty_like(xc);
  const int64_t d = x.size(-1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fused_add", [&] {
    rms_rows<scalar_t>(xc.data_ptr<scalar_t>(), rc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
                       out.data_ptr<scalar_t>(), res_out.data_ptr<scalar_t>(), xc.numel() / d,
                       d, eps);
  });
  return {out, res_out};
}

// silu then an in-place multiply: ATen's vectorized kernels (a scalar exp loop measured 3x slower
// than ATen's at I=4864), minus the Python dispatch per op and one [T, I] temporary.
at::Tensor silu_and_mul(const at::Tensor& gate, const at::Tensor& up) {
  auto out = at::silu(gate);
  if (out.sizes() != up.sizes() || out.scalar_type() != up.scalar_type()) return out * up;
  return out.mul_(up);
}

at::Tensor rotate_composite(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  auto rot = at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
  return x * cos + rot * sin;
}

// out = T(x * cos) + T(rotate_half(x) * sin), x [T, H, D] with a unit inner stride, cos/sin
// [T, 1, D] contiguous: one read of x, one write of out.
at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const bool ok = x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0 && cos.dim() == 3 &&
                  cos.sizes() == sin.sizes() && cos.size(0) == x.size(0) && cos.size(1) == 1 &&
                  cos.size(2) == x.size(2) && cos.scalar_type() == x.scalar_type() &&
                  sin.scalar_type() == x.scalar_type() && x.numel() <= kMaxDirectElems;
  if (!ok) return rotate_composite(x, cos, sin);
  auto c = cos.contiguous();
  auto s = sin.contiguous();
  auto out = at::empty(x.sizes(), x.options());
  const int64_t tokens = x.size(0), heads = x.size(1), d = x.size(2), half = d / 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rotary", [&] {
    using T = scalar_t;
    const T* xp = x.data_ptr<T>();
    const T* cp = c.data_ptr<T>();
    const T* sp = s.data_ptr<T>();
    T* op = out.data_ptr<T>();
    const int64_t st = x.stride(0), sh = x.stride(1);
    auto mul = [](T a, T b) { return static_cast<float>(static_cast<T>(
                                  static_cast<float>(a) * static_cast<float>(b))); };
    at::parallel_for(0, tokens * heads, grain(d), [&](int64_t begin, int64_t end) {
      for (int64_t th = begin; th < end; ++th) {
        const int64_t t = th / heads, h = th % heads;
        const T* xr = xp + t * st + h * sh;
        const T* cr = cp + t * d;
        const T* sr = sp + t * d;
        T* o = op + th * d;
        for (int64_t i = 0; i < half; ++i) {
          o[i] = static_cast<T>(mul(xr[i], cr[i]) + mul(static_cast<T>(-static_cast<float>(
                                                            xr[i + half])), sr[i]));
          o[i + half] = static_cast<T>(mul(xr[i + half], cr[i + half]) +
                                       mul(xr[i], sr[i + half]));
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> rotary_embedding(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& cos,
                                                    const at::Tensor& sin) {
  return {rotate(q, cos, sin), rotate(k, cos, sin)};
}

// xllm::store_kv: this step's K/V into the cache at (slot, position), in place.
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
at::Tensor attention(const at::Tensor& q, const at::Tensor& kv_cache, int64_t layer,
                     const at::Tensor& positions, const at::Tensor& seq_slots,
                     const at::Tensor& query_lens, const at::Tensor& seq_lens, double scale,
                     int64_t window) {
  auto cache = kv_cache.select(0, layer);  // [2, S, M, Hkv, D]
  auto slots = seq_slots.to(at::kLong).contiguous();
  auto qlens = query_lens.to(at::kLong).contiguous();
  auto slens = seq_lens.to(at::kLong).contiguous();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t* qlen = qlens.data_ptr<int64_t>();
  const int64_t* slen = slens.data_ptr<int64_t>();
  const bool gqa = q.size(1) != cache.size(3);
  auto out = at::empty_like(q);
  int64_t start = 0;
  for (int64_t b = 0; b < slots.size(0); ++b) {
    const int64_t n = qlen[b], len = slen[b];
    const int64_t lo = (n == 1 && window > 0) ? std::max<int64_t>(0, len - window) : 0;
    auto k = cache.select(0, 0).select(0, slot[b]).slice(0, lo, len).transpose(0, 1);
    auto v = cache.select(0, 1).select(0, slot[b]).slice(0, lo, len).transpose(0, 1);
    auto qb = q.slice(0, start, start + n).transpose(0, 1).unsqueeze(0);  // [1, H, n, D]
    std::optional<at::Tensor> mask;
    if (n > 1) {  // prefill: causal (and windowed) by position
      auto k_pos = at::arange(lo, len, positions.options());
      auto q_pos = positions.slice(0, start, start + n).unsqueeze(1);
      auto m = k_pos.unsqueeze(0) <= q_pos;
      if (window > 0) m = m & (k_pos.unsqueeze(0) > q_pos - window);
      mask = m;
    }
    auto o = at::scaled_dot_product_attention(qb, k.unsqueeze(0).contiguous(),
                                              v.unsqueeze(0).contiguous(), mask, 0.0, false,
                                              scale, gqa);  // [1, H, n, D]
    out.slice(0, start, start + n).copy_(o.squeeze(0).transpose(0, 1));
    start += n;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(xllm, CPU, m) {
  m.impl("store_kv", &store_kv);
  m.impl("attention", &attention);
  m.impl("rms_norm", &rms_norm);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rotary_embedding", &rotary_embedding);
}
