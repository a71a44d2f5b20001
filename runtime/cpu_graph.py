"""CPU graphs: a bucket's program recorded once over its static buffers and replayed without
Python: the CPU twin of a CUDA graph (runtime/step_builders.py, backend "cpu_graph").

A decode step of a small model on the CPU spends a quarter of its time outside the kernels: the
generated `forward` runs one Python statement per node (~760 for SmolLM2) and every op call
crosses from Python into the dispatcher (~2 us each, views included). A bucket's program always
runs on the same tensors (the static input buffer, the weights, the KV cache and, over the
activation arena, the same memory for every planned result), so its op sequence can be recorded
once and run by a C++ interpreter: `torch.jit.trace` of the program on those tensors. The trace
holds the bucket's shapes as constants (a bucket's shapes are fixed) and the arena's views as
constants (the same memory every call); it is made in memory from the loaded program, never
saved or loaded (an artifact holds no TorchScript).

    graph = CpuGraph.capture(program, args)   # traces it on `args` (~0.1 s for SmolLM2)
    (logits,) = graph.replay()                # the step, on whatever the buffers now hold

Measured (SmolLM2-135M Q4_1, 2 threads, decode bucket of 1, one process, alternating):
arena program 8.8 ms/step, its trace 6.4 ms, bit-identical logits.

Valid while the captured tensors stay where they are (the runner's static buffers, the weights
and the KV pool do); outputs in the arena are overwritten by the next replay of any graph
sharing it: copy what must be kept.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import fx


class CpuGraph:
    """A recorded step: `replay()` returns the program's outputs (a tuple)."""

    def __init__(self, traced, args: Sequence) -> None:
        self.traced, self.args = traced, tuple(args)

    @classmethod
    @torch.inference_mode()
    def capture(cls, gm: fx.GraphModule, args: Sequence) -> CpuGraph:
        """Trace `gm` on `args`, the tensors every replay reads."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings: constant shapes are the point
            traced = torch.jit.trace(gm, tuple(args), check_trace=False, strict=False)
        return cls(traced, args)

    def replay(self) -> tuple:
        out = self.traced(*self.args)
        return out if isinstance(out, tuple) else (out,)
