"""lower_ops: bind every xllm:: op in the graph to the target device's implementation, and
record which one runs (stats.details["bindings"]: op -> "cpu kernel" | "reference").

On CPU it first lowers the matmuls to the device's own kernel:

    linear = aten.linear(x, w_qkv, b)        ->   linear = xllm.linear(x, w_qkv, b)

xllm::linear (kernels/linear.py, kernels/cpu/xllm_linear.cpp) reads each weight row once for all
rows of a decode step (up to 32 rows in fp32, 8 in bf16) and calls ATen's linear beyond: on
SmolLM2/Qwen2.5 weights, 0.47-0.84x ATen's time for 4-32 rows in fp32 and 0.45-0.95x for 1-8
rows in bf16 (tools/bench/bench_kernels.py --ops linear). It has an `.out` overload, so the
memory planner still places its result in the activation arena. fp16 and mixed dtypes keep
aten.linear, as do other devices (their GEMMs are the fast path there).

On CPU, binding loads the C++ kernels (kernels/cpu/, built once per machine), which register
themselves for the CPU dispatch key: the graph keeps calling `torch.ops.xllm.<op>` (the saved
program stays device-neutral) and the dispatcher picks the kernel. On cuda and npu no kernels

On cuda and npu nothing is rewritten: the CUDA and NPU dispatch registrations call through the
kernel registry (kernels/registry.py: Triton on CUDA, torch_npu on Ascend, each with its
fallbacks), and the pass records what the registry binds on this machine for each op and why
any fallback was taken (stats.details["fallbacks"]).
"""

from __future__ import annotations

import torch
from torch import fx

from xllm_compile.kernels import cpu as cpu_kernels
from xllm_compile.kernels import registry
from xllm_compile.passes.base import Pass, PassContext, PassStats
from xllm_compile.passes.match import aten, is_call, val

DEVICE_KEYS = {"cpu": "CPU"}
LINEAR_DTYPES = (torch.float32, torch.bfloat16)  # what xllm::linear's CPU kernel streams


def xllm_ops(gm: fx.GraphModule) -> list[str]:
    """Names (`xllm::rms_norm`) of the xllm ops the graph calls, in first-use order."""
    names = []
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op == "call_function" and schema is not None and schema.name.startswith("xllm::"):
            if schema.name not in names:
                names.append(schema.name)
    return names


class LowerOps(Pass):
    name = "lower_ops"
    VERSION = 3  # 2: CPU aten.linear -> xllm::linear; 3: cuda/npu bindings from the registry
    description = "bind each xllm:: op to the device's kernel (CPU: C++ kernels, xllm::linear)"

    def applies(self, ctx: PassContext) -> str | None:
        if ctx.device not in registry.BACKENDS:
            return f"no {ctx.device} kernels: the reference implementations run"
        return None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassStats:
        if ctx.device != "cpu":
            return self._registry_bindings(gm, ctx.device)
        stats = PassStats()
        why_not = cpu_kernels.ensure_loaded()
        if why_not is None:
            stats.count("aten.linear -> xllm::linear", use_linear_kernel(gm))
        key = DEVICE_KEYS[ctx.device]
        bindings = {}
        for name in xllm_ops(gm):
            short = name.removeprefix("xllm::")
            compiled = why_not is None and short in cpu_kernels.OPS
            has_key = torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
            bindings[name] = "cpu kernel" if compiled and has_key else "reference"
            stats.count(bindings[name])
        stats.matches = sum(1 for b in bindings.values() if b != "reference")
        stats.details["linear_kept"] = sum(
            1 for n in gm.graph.nodes if is_call(n, aten.linear.default)
        )
        stats.details["bindings"] = bindings
        if why_not is not None:
            stats.details["fallback"] = why_not
        return stats

    @staticmethod
    def _registry_bindings(gm: fx.GraphModule, device: str) -> PassStats:
        """What the kernel registry binds on `device` here for each op (nothing is rewritten)."""
        stats, bindings, fallbacks = PassStats(), {}, {}
        known = registry.registry()
        for name in xllm_ops(gm):
            short = name.removeprefix("xllm::")
            if short not in known:
                bindings[name] = "reference"
            else:
                impl, skipped = registry.choose(short, device)
                bindings[name] = impl.name
                if skipped:
                    fallbacks[name] = [f"{i.name}: {why}" for i, why in skipped]
            stats.count(bindings[name])
        stats.matches = sum(1 for b in bindings.values() if b != "reference")
        stats.details["bindings"] = bindings
        if fallbacks:
            stats.details["fallbacks"] = fallbacks
        return stats


def use_linear_kernel(gm: fx.GraphModule) -> int:
    """Retarget every aten.linear whose operands the kernel takes; returns how many."""
    done = 0
    for node in [n for n in gm.graph.nodes if is_call(n, aten.linear.default)]:
        x, w = val(node.args[0]), val(node.args[1])
        if x is None or w is None or w.dim() != 2 or x.dtype not in LINEAR_DTYPES:
            continue
        if w.dtype == x.dtype:
            node.target = torch.ops.xllm.linear.default
            done += 1
    return done
