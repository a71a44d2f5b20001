// xllm::CpuProgram: a bucket's op sequence run by one C++ loop (runtime/cpu_graph.py builds it).
//
// A CPU graph replays a program whose every input is the same tensor each step (static buffers,
// weights, the KV pool, arena views), so each op's arguments are fixed but for the results of
// the ops before it. A step here is an operator handle, its argument stack with the fixed
// values already in place, the stack positions that take an earlier result, and the slots its
// results go to: a replay is one loop of stack copies and dispatcher calls, with no interpreter
// between them (TorchScript's costs ~1 us an op more: instructions, its own stack, constants).
// Slots are released after their last reader, so no replay keeps more alive than the op order
// needs. The hot ops are called as plain C++ functions (xllm_ops.h) unless an observer (the
// profiler) is listening: then every op goes through the dispatcher, which reports it.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ScalarOps.h>
#include <ATen/record_function.h>
#include <c10/core/InferenceMode.h>
#include <torch/custom_class.h>
#include <torch/extension.h>

#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

#include "xllm_ops.h"
#include "xllm_pool.h"

namespace {

// The ops a step calls as plain C++ functions (xllm_ops.h), skipping the dispatcher's boxing,
// key computation and unboxing: the decode step's hot ones (SmolLM2: 306 of its 306 ops).
enum class Kind { kBoxed, kLinearOut, kLinearQOut, kAttentionOut, kRmsNorm, kFusedAddRmsNorm, kSiluAndMul,
                  kRotary, kStoreKv };

Kind kind_of(const std::string& name, const std::string& overload) {
  if (name == "xllm::linear" && overload == "out") return Kind::kLinearOut;
  if (name == "xllm::linear_q" && overload == "out") return Kind::kLinearQOut;
  if (name == "xllm::attention" && overload == "out") return Kind::kAttentionOut;
  if (!overload.empty()) return Kind::kBoxed;
  if (name == "xllm::rms_norm") return Kind::kRmsNorm;
  if (name == "xllm::fused_add_rms_norm") return Kind::kFusedAddRmsNorm;
  if (name == "xllm::silu_and_mul") return Kind::kSiluAndMul;
  if (name == "xllm::rotary_embedding") return Kind::kRotary;
  if (name == "xllm::store_kv") return Kind::kStoreKv;
  return Kind::kBoxed;
}

struct Step {
  c10::OperatorHandle op;
  Kind kind = Kind::kBoxed;
  std::vector<const c10::IValue*> ref;  // argument i: the stack's fixed value or its slot
  std::vector<c10::IValue> stack;  // the fixed arguments (and placeholders for the others)
  std::vector<int64_t> arg_pos, arg_slot;  // stack[arg_pos[i]] = slots[arg_slot[i]]
  std::vector<int64_t> out_slot;  // result i -> slots[out_slot[i]] (-1: not kept)
  std::vector<int64_t> release;  // slots read for the last time here
};

// An argument given from Python as a plain value in the type its schema declares: a list
// (inferred Tensor[], int[], ...) where Tensor?[] is declared (aten::index's indices), a number
// where a Tensor is (`x * 2.0` in a graph), wrapped as Python's binding wraps it (a 0-dim
// tensor marked a wrapped number, so type promotion treats it as the scalar it was).
c10::IValue coerce(const c10::IValue& v, const c10::TypePtr& type) {
  if (type->kind() == c10::TypeKind::TensorType && (v.isDouble() || v.isInt() || v.isBool())) {
    at::Tensor t = c10::scalar_to_tensor(v.toScalar());
    t.unsafeGetTensorImpl()->set_wrapped_number(true);
    return t;
  }
  if (v.isTensorList() && type->kind() == c10::TypeKind::ListType &&
      type->castRaw<c10::ListType>()->getElementType()->kind() == c10::TypeKind::OptionalType) {
    c10::List<std::optional<at::Tensor>> list;
    for (const at::Tensor& t : v.toTensorVector()) list.push_back(t);
    return list;
  }
  return v;
}

struct CpuProgram : torch::CustomClassHolder {
  std::vector<Step> steps;
  std::vector<c10::IValue> slots;  // results of earlier steps (None once released)
  std::vector<at::Tensor> fixed;   // slots whose value never changes (static outputs)
  std::vector<int64_t> outputs;
  bool direct = true;  // call the hot ops as C++ functions (else every op boxed)
  bool pool = false;  // hold the intra-op threads for the whole replay (xllm_pool.h)
  int64_t pooled = 0;
  bool profile = false;  // time each step (seconds summed over runs, in `elapsed`)
  std::vector<double> elapsed;
  std::vector<int64_t> next_linear;  // step -> the next quantized linear's step (prepare())
  bool ready = false;

  int64_t add_slot() {
    TORCH_CHECK(!ready, "xllm::CpuProgram: add_slot after the first run");
    slots.emplace_back();
    fixed.emplace_back();
    return static_cast<int64_t>(slots.size()) - 1;
  }

  int64_t add_static(const at::Tensor& t) {
    const int64_t s = add_slot();
    fixed[s] = t;
    return s;
  }

  // `args`: the op's arguments in schema order (kwargs included), fixed values in place and
  // None where arg_slot names the slot an earlier result is read from.
  void add_step(const std::string& name, const std::string& overload,
                const std::vector<c10::IValue>& args, const std::vector<int64_t>& arg_pos,
                const std::vector<int64_t>& arg_slot, const std::vector<int64_t>& out_slot,
                const std::vector<int64_t>& release) {
    TORCH_CHECK(!ready, "xllm::CpuProgram: add_step after the first run");
    auto handle = c10::Dispatcher::singleton().findSchema({name, overload});
    TORCH_CHECK(handle.has_value(), "xllm::CpuProgram: no operator ", name, ".", overload);
    const auto& schema = handle->schema();
    TORCH_CHECK(args.size() == schema.arguments().size(), "xllm::CpuProgram: ", name, " takes ",
                schema.arguments().size(), " arguments, given ", args.size());
    TORCH_CHECK(out_slot.size() == schema.returns().size(), "xllm::CpuProgram: ", name,
                " returns ", schema.returns().size(), " values, given ", out_slot.size());
    TORCH_CHECK(arg_pos.size() == arg_slot.size(), "xllm::CpuProgram: arg_pos/arg_slot");
    Step step{*handle, kind_of(name, overload), {}, {}, arg_pos, arg_slot, out_slot, release};
    for (size_t i = 0; i < args.size(); ++i) {
      step.stack.push_back(coerce(args[i], schema.arguments()[i].type()));
    }
    auto check_slot = [&](int64_t s, int64_t lo) {
      TORCH_CHECK(s >= lo && s < (int64_t)slots.size(), "xllm::CpuProgram: bad slot ", s);
    };
    for (int64_t p : arg_pos) {
      TORCH_CHECK(p >= 0 && p < (int64_t)args.size(), "xllm::CpuProgram: bad arg_pos ", p);
    }
    for (int64_t s : arg_slot) check_slot(s, 0);
    for (int64_t s : out_slot) check_slot(s, -1);
    for (int64_t s : release) check_slot(s, 0);
    steps.push_back(std::move(step));
  }

  void set_outputs(const std::vector<int64_t>& out) {
    for (int64_t s : out) {
      TORCH_CHECK(s >= 0 && s < (int64_t)slots.size(), "xllm::CpuProgram: bad output ", s);
    }
    outputs = out;
  }

  void set_direct(bool on) { direct = on; }

  // A replay on the step pool: one parallel region for all its ops, the next quantized linear's
  // weight prefetched by the idle threads (decode-sized steps: every parallel op is ours).
  void set_pool(bool on) { pool = on; }

  // How many replays returned from the pool (one thread, or a run inside a parallel region:
  // plainly; a replay that raised is not counted).
  int64_t pool_runs() const { return pooled; }

  // Per-step wall time from here on: `step_seconds()` sums each step's over the runs since.
  void set_profile(bool on) {
    profile = on;
    elapsed.assign(steps.size(), 0.0);
  }

  std::vector<double> step_seconds() const { return elapsed; }

  std::vector<std::string> step_names() const {
    std::vector<std::string> names;
    for (const Step& step : steps) {
      const auto& n = step.op.operator_name();
      names.push_back(n.overload_name.empty() ? n.name : n.name + "." + n.overload_name);
    }
    return names;
  }

  int64_t num_steps() const { return static_cast<int64_t>(steps.size()); }

  // How many steps call their op as a C++ function (the rest go through the dispatcher).
  int64_t num_direct() {
    prepare();
    int64_t n = 0;
    for (const Step& step : steps) n += step.kind != Kind::kBoxed;
    return n;
  }

  std::vector<at::Tensor> run() {
    c10::InferenceMode guard;
    prepare();
    if (!pool) return run_steps();
    std::vector<at::Tensor> result;
    pooled += xllm_pool_run([&] { result = run_steps(); });
    return result;
  }

 private:
  std::vector<at::Tensor> run_steps() {
    for (size_t s = 0; s < slots.size(); ++s) {
      if (fixed[s].defined()) slots[s] = fixed[s];
    }
    // under an observer (torch.profiler, `xllm profile ops`) every op goes through the
    // dispatcher, which reports it with its inputs; a direct call would be invisible to it
    const bool fast = direct && !at::hasCallbacks();
    torch::jit::Stack stack;
    using Clock = std::chrono::steady_clock;
    auto last = profile ? Clock::now() : Clock::time_point();
    for (size_t k = 0; k < steps.size(); ++k) {
      const Step& step = steps[k];
      if (pool && next_linear[k] >= 0) {  // what the pool's idle threads prefetch after this one
        const at::Tensor& w = steps[next_linear[k]].ref[1]->toTensor();
        xllm_pool_next_linear(w.const_data_ptr(), w.size(1), w.size(0));
      }
      if (fast && step.kind != Kind::kBoxed) {
        call_direct(step);
      } else {
        stack = step.stack;
        for (size_t i = 0; i < step.arg_pos.size(); ++i) {
          stack[step.arg_pos[i]] = slots[step.arg_slot[i]];
        }
        step.op.callBoxed(stack);
        for (size_t i = 0; i < step.out_slot.size(); ++i) {
          if (step.out_slot[i] >= 0) slots[step.out_slot[i]] = std::move(stack[i]);
        }
      }
      for (int64_t s : step.release) slots[s] = c10::IValue();
      if (profile) {
        const auto now = Clock::now();
        elapsed[k] += std::chrono::duration<double>(now - last).count();
        last = now;
      }
    }
    std::vector<at::Tensor> result;
    result.reserve(outputs.size());
    for (int64_t s : outputs) result.push_back(slots[s].toTensor());
    for (auto& v : slots) v = c10::IValue();
    return result;
  }

  // Once, after the last step is added: each argument's address (the stack's fixed value or its
  // slot: neither moves from here), and the boxed path for a step whose fixed tensors are not
  // all CPU tensors (the direct functions are the CPU kernels).
  void prepare() {
    if (ready) return;
    ready = true;
    for (Step& step : steps) {
      step.ref.resize(step.stack.size());
      for (size_t i = 0; i < step.stack.size(); ++i) step.ref[i] = &step.stack[i];
      for (size_t i = 0; i < step.arg_pos.size(); ++i) {
        step.ref[step.arg_pos[i]] = &slots[step.arg_slot[i]];
      }
      for (const c10::IValue& v : step.stack) {
        if (v.isTensor() && !v.toTensor().is_cpu()) step.kind = Kind::kBoxed;
      }
    }
    // each quantized linear's successor (-1: none): its weight is a fixed argument
    next_linear.assign(steps.size(), -1);
    int64_t after = -1;
    for (int64_t k = static_cast<int64_t>(steps.size()) - 1; k >= 0; --k) {
      const Step& step = steps[k];
      if (step.kind != Kind::kLinearQOut) continue;
      next_linear[k] = after;
      const c10::IValue& w = step.stack[1];
      const bool fixed_weight = std::find(step.arg_pos.begin(), step.arg_pos.end(), 1) == step.arg_pos.end();
      after = fixed_weight && w.isTensor() && w.toTensor().dim() == 2 ? k : -1;
    }
  }

  void put(const Step& step, size_t i, at::Tensor t) {
    if (step.out_slot[i] >= 0) slots[step.out_slot[i]] = std::move(t);
  }

  void call_direct(const Step& step) {
    const auto& a = step.ref;
    auto T = [&](size_t i) -> const at::Tensor& { return a[i]->toTensor(); };
    switch (step.kind) {
      case Kind::kLinearOut: {
        const std::optional<at::Tensor> bias =
            a[2]->isNone() ? std::nullopt : std::optional<at::Tensor>(T(2));
        at::Tensor out = T(3);
        xllm_direct::linear_out(T(0), T(1), bias, out);
        break;
      }
      case Kind::kLinearQOut: {
        const std::string& qtype = a[2]->toStringRef();
        const std::optional<at::Tensor> bias =
            a[3]->isNone() ? std::nullopt : std::optional<at::Tensor>(T(3));
        at::Tensor out = T(4);
        xllm_direct::linear_q_out(T(0), T(1), c10::string_view(qtype.data(), qtype.size()), bias,
                                  out);
        break;
      }
      case Kind::kAttentionOut: {
        at::Tensor out = T(9);
        xllm_direct::attention_out(T(0), T(1), a[2]->toInt(), T(3), T(4), T(5), T(6),
                                   a[7]->toDouble(), a[8]->toInt(), out);
        break;
      }
      case Kind::kRmsNorm:
        put(step, 0, xllm_direct::rms_norm(T(0), T(1), a[2]->toDouble()));
        break;
      case Kind::kFusedAddRmsNorm: {
        auto [out, res] = xllm_direct::fused_add_rms_norm(T(0), T(1), T(2), a[3]->toDouble());
        put(step, 0, std::move(out));
        put(step, 1, std::move(res));
        break;
      }
      case Kind::kSiluAndMul:
        put(step, 0, xllm_direct::silu_and_mul(T(0), T(1)));
        break;
      case Kind::kRotary: {
        auto [q, k] = xllm_direct::rotary_embedding(T(0), T(1), T(2), T(3), a[4]->toBool());
        put(step, 0, std::move(q));
        put(step, 1, std::move(k));
        break;
      }
      case Kind::kStoreKv:
        xllm_direct::store_kv(T(0), a[1]->toInt(), T(2), T(3), T(4), T(5));
        break;
      case Kind::kBoxed:
        break;
    }
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(xllm, m) {
  m.class_<CpuProgram>("CpuProgram")
      .def(torch::init<>())
      .def("add_slot", &CpuProgram::add_slot)
      .def("add_static", &CpuProgram::add_static)
      .def("add_step", &CpuProgram::add_step)
      .def("set_outputs", &CpuProgram::set_outputs)
      .def("set_direct", &CpuProgram::set_direct)
      .def("set_pool", &CpuProgram::set_pool)
      .def("pool_runs", &CpuProgram::pool_runs)
      .def("num_steps", &CpuProgram::num_steps)
      .def("num_direct", &CpuProgram::num_direct)
      .def("set_profile", &CpuProgram::set_profile)
      .def("step_seconds", &CpuProgram::step_seconds)
      .def("step_names", &CpuProgram::step_names)
      .def("run", &CpuProgram::run);
  m.def("pool_stats() -> int[]", [] { return xllm_pool_stats(); });
}
