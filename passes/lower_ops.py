"""lower_ops: bind every xllm:: op in the graph to the target device's implementation, and
record which one runs (stats.details["bindings"]: op -> "cpu kernel" | "reference").

On CPU, binding loads the C++ kernels (kernels/cpu/, built once per machine), which register
themselves for the CPU dispatch key: the graph keeps calling `torch.ops.xllm.<op>` (the saved
program stays device-neutral) and the dispatcher picks the kernel. On cuda and npu no kernels
exist yet (issue 3 scope is CPU): the pass is skipped with that reason and the reference
implementations run.
"""

from __future__ import annotations

import torch
from torch import fx

from xllm_compile.kernels import cpu as cpu_kernels
from xllm_compile.passes.base import Pass, PassContext, PassStats

DEVICE_KEYS = {"cpu": "CPU"}


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
    VERSION = 1
    description = "bind each xllm:: op to the device's kernel (CPU: C++ kernels)"

    def applies(self, ctx: PassContext) -> str | None:
        if ctx.device not in DEVICE_KEYS:
            return f"no {ctx.device} kernels yet: the reference implementations run"
        return None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassStats:
        stats = PassStats()
        why_not = cpu_kernels.ensure_loaded()
        key = DEVICE_KEYS[ctx.device]
        bindings = {}
        for name in xllm_ops(gm):
            short = name.removeprefix("xllm::")
            compiled = why_not is None and short in cpu_kernels.OPS
            has_key = torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
            bindings[name] = "cpu kernel" if compiled and has_key else "reference"
            stats.count(bindings[name])
        stats.matches = sum(1 for b in bindings.values() if b != "reference")
        stats.details["bindings"] = bindings
        if why_not is not None:
            stats.details["fallback"] = why_not
        return stats
