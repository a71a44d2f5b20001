// The CPU kernels of the xllm:: ops as plain C++ functions, for callers in this library that
// run them without the dispatcher (xllm_program.cpp); the same functions the CPU dispatch key
// runs (registered in the file that defines each).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace xllm_direct {

at::Tensor& linear_out(const at::Tensor& x, const at::Tensor& w,
                       const std::optional<at::Tensor>& b, at::Tensor& out);
at::Tensor& linear_q_out(const at::Tensor& x, const at::Tensor& qweight, c10::string_view qtype,
                         const std::optional<at::Tensor>& bias, at::Tensor& out);
at::Tensor& attention_out(const at::Tensor& q, const at::Tensor& kv_cache, int64_t layer,
                          const at::Tensor& positions, const at::Tensor& seq_slots,
                          const at::Tensor& query_lens, const at::Tensor& seq_lens, double scale,
                          int64_t window, at::Tensor& out);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x, const at::Tensor& res,
                                                      const at::Tensor& w, double eps);
at::Tensor silu_and_mul(const at::Tensor& gate, const at::Tensor& up);
std::tuple<at::Tensor, at::Tensor> rotary_embedding(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& cos, const at::Tensor& sin,
                                                    bool is_neox);
void store_kv(at::Tensor kv_cache, int64_t layer, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& token_slots, const at::Tensor& positions);

}  // namespace xllm_direct
