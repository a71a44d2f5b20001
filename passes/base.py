"""What every pass is: `Pass` (name, VERSION, `run`), the `PassContext` it runs with (dtype,
device, sample inputs, and the weights, which a pass may add to or remove from) and the
`PassStats` it returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

PARAM_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


@dataclass
class PassStats:
    """What a pass did. `matches` counts rewritten pattern instances; `replaced` maps what was
    rewritten (an op or pattern name) to a count; `details` holds anything else worth logging."""

    nodes_before: int = 0
    nodes_after: int = 0
    matches: int = 0
    replaced: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def count(self, what: str, n: int = 1) -> None:
        if n:
            self.replaced[what] = self.replaced.get(what, 0) + n

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PassContext:
    """Everything a pass may read besides the graph, and the one way to change parameters.

    Args:
        ep: the program being optimized; passes edit `ep.graph_module` in place.
        weights: real tensors by parameter/buffer name (the program itself holds meta tensors).
        dtype: the model's activation dtype (sets the verify tolerance).
        device: the target device ("cpu", "cuda", "npu").
        sample_inputs: user inputs to run the graph on for `verify` (None: no verification).
        config: the model config, for passes that want shape facts (opaque to the manager).
        quant: the weight quantization asked for (`--quant`: "none", "keep", "q4_1", ...).
        blocks: with `--quant keep`, a GGUF's quantized matmul weights as they are, by parameter
            name: (format, uint8 [N, row_bytes]) (kernels/linear_q.py); merges keep it current.
    """

    ep: ExportedProgram
    weights: dict[str, torch.Tensor]
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    sample_inputs: tuple | None = None
    config: Any = None
    quant: str = "none"
    blocks: dict[str, tuple[str, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def from_exported(cls, ep: ExportedProgram, sample_inputs=None, **kw) -> PassContext:
        """A context whose weights are the program's own (tests: a module exported with data)."""
        weights = {**ep.state_dict, **ep.constants}
        return cls(ep=ep, weights=dict(weights), sample_inputs=sample_inputs, **kw)

    @property
    def gm(self) -> fx.GraphModule:
        return self.ep.graph_module

    def _specs_by_node(self) -> dict[str, InputSpec]:
        return {s.arg.name: s for s in self.ep.graph_signature.input_specs if s.kind in PARAM_KINDS}

    def param_name(self, node: fx.Node) -> str | None:
        """The parameter/buffer name a placeholder binds, or None for user inputs and others."""
        if node.op != "placeholder":
            return None
        spec = self._specs_by_node().get(node.name)
        return spec.target if spec else None

    def weight(self, node: fx.Node) -> torch.Tensor | None:
        name = self.param_name(node)
        return None if name is None else self.weights.get(name)

    def param_order(self) -> list[str]:
        """Parameter/buffer names in placeholder order: what the program is called with first."""
        specs = self.ep.graph_signature.input_specs
        return [s.target for s in specs if s.kind in PARAM_KINDS]

    def add_param(self, name: str, tensor: torch.Tensor) -> fx.Node:
        """Add a parameter: a placeholder after the last parameter, its input spec, a meta entry in
        the program's state_dict and the real tensor in `weights`. Returns the placeholder."""
        sig, graph = self.ep.graph_signature, self.gm.graph
        placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
        last = max(i for i, s in enumerate(sig.input_specs) if s.kind == InputKind.PARAMETER)
        anchor = placeholders[sig.input_specs[last].arg.name]
        ref_val = anchor.meta["val"]
        with graph.inserting_after(anchor):
            node = graph.placeholder(_placeholder_name(name, placeholders))
        with ref_val.fake_mode:
            node.meta["val"] = torch.empty(tensor.shape, dtype=tensor.dtype, device=ref_val.device)
        sig.input_specs.insert(
            last + 1, InputSpec(InputKind.PARAMETER, TensorArgument(node.name), name, None)
        )
        held = self.ep.state_dict
        is_meta = any(t.is_meta for t in held.values())
        held[name] = torch.nn.Parameter(
            tensor.to("meta") if is_meta else tensor, requires_grad=False
        )
        self.weights[name] = tensor
        return node

    def remove_param(self, node: fx.Node) -> None:
        """Remove an unused parameter placeholder everywhere `add_param` puts one."""
        assert not node.users, f"{node.name} still has users"
        name = self.param_name(node)
        sig = self.ep.graph_signature
        sig.input_specs[:] = [s for s in sig.input_specs if s.arg.name != node.name]
        self.ep.state_dict.pop(name, None)
        self.ep.constants.pop(name, None)
        self.weights.pop(name, None)
        self.gm.graph.erase_node(node)


def _placeholder_name(param: str, taken: dict) -> str:
    base = "p_" + param.replace(".", "_")
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


class Pass:
    """A graph pass. Subclasses set `name` (unique in the pipeline) and `VERSION` (bump whenever
    the pass's output changes: the artifact records both) and implement `run`."""

    name: str = ""
    VERSION: int = 1
    description: str = ""
    # a pass that changes the numbers on purpose (quantization) sets the drift it may cause
    # (relative, as the manager measures it); None: the dtype's rounding tolerance
    lossy_tolerance: float | None = None

    def applies(self, ctx: PassContext) -> str | None:
        """None when the pass should run, else the reason it is skipped (logged and recorded)."""
        return None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassStats:
        """Rewrite `gm` in place. The manager fills nodes_before/after, lints and recompiles."""
        raise NotImplementedError
