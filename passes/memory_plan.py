"""Memory planning: the activation buffers of one static shape bucket as offsets in one arena.

Not a rewrite: the program stays functional and symbolic (it serves every bucket). For one
bucket's concrete shapes this works out where each intermediate tensor would live:

    linear_0 = linear(x, w0)          # [T, 512] -> arena[0, 4096)
    gelu_0   = gelu(linear_0)         # dies here -> in place: arena[0, 4096) again
    linear_1 = linear(gelu_0, w1)     # [T, 256] -> arena[4096, 6144)
    out      = index(linear_1, [idx]) # output: live to the end

1. Shapes: the graph runs once on meta tensors of the bucket's shapes (fx.Interpreter; the
   `xllm::` ops have fake impls), so sizes hold after any pass, whatever `meta["val"]` says.
2. Lifetimes: `graph_utils.buffer_liveness`: a node's interval runs from its definition to the
   last use of anything that may alias it (views, reshapes, getitem, split outputs, in-place
   writes), outputs to the end. Placeholders (weights, inputs, the KV cache) and what aliases
   them are never planned.
3. What is planned: fresh, contiguous, single-tensor results of ATen and xllm ops that have an
   `.out` overload (`OutCall`: how a program writes them into the arena, `runtime/arena.py`;
   xllm::linear has one). The rest (the other `xllm::` ops, multi-output ops) keep allocating:
   counted as unplanned. So does an op whose `.out` only copies its result on the target
   device (`DIRECT_OUT_DEVICES`: xllm::attention writes into `out` on CPU; elsewhere a copy
   would be one more kernel a layer).
4. In place: a pointwise op whose input buffer (planned, same dtype and shape, no alias of it
   read elsewhere by the op) dies at that op writes over it: they share one allocation.
5. Offsets: greedy by size with best fit (Pisarchyk & Lee, "Efficient Memory Management for
   Deep Neural Net Inference", 2020, section 4.3): allocations sorted by size, largest first;
   each takes the smallest gap between already placed allocations whose lifetimes overlap its
   own that fits it, else goes above them. Sizes and offsets are multiples of 64 bytes.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from xllm_compile.passes.graph_utils import buffer_liveness, storage_groups

ALIGNMENT = 64  # bytes: a cache line, and more than any dtype or vector load needs


@dataclass(frozen=True)
class Arg:
    """In `OutCall.args`: the node's positional argument `index`."""

    index: int
    is_arg = True  # how the artifact's format (arena_plans.StoredPlan.of) tells it from a value


@dataclass(frozen=True)
class OutCall:
    """How a planned node writes its result into given memory: `op(*args, **kwargs, out=...)`.
    `args` None: the node's own args and kwargs; else the positional args, each an `Arg` (one of
    the node's) or a constant (embedding(w, ids) -> index_select.out(w, 0, ids): the same kernel
    embedding runs for 1-D ids, while the generated embedding.out allocates and copies). The
    artifact stores it as arena_plans.OutCall (this package never imports that format)."""

    op: object
    out: str = "out"
    args: tuple | None = None


@dataclass
class PlannedBuffer:
    """One planned node's output: `size` bytes (aligned) at `offset` in the arena, live over the
    node indices [start, end], written by `call`. `reuses` names the node whose buffer it
    overwrites in place."""

    node: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    size: int
    start: int
    end: int
    call: OutCall
    offset: int = -1
    reuses: str | None = None


@dataclass
class MemoryPlan:
    """Where every planned node of one bucket writes its output, in one arena of `arena_bytes`.

    `naive_bytes` is what one allocation per planned node would take; `live_lower_bound_bytes` is
    the most bytes (of those allocations, in-place pairs sharing one) ever live at once, which no
    placement can beat. `guards` lists (placeholder index, dim, size): the input sizes the
    planned shapes depend on, which a planned program must check before writing."""

    buffers: dict[str, PlannedBuffer]  # node name -> buffer, in graph order
    arena_bytes: int
    naive_bytes: int
    live_lower_bound_bytes: int
    unplanned: dict[str, str] = field(default_factory=dict)  # node name -> why not
    guards: tuple[tuple[int, int, int], ...] = ()
    input_shapes: tuple[tuple[int, ...] | None, ...] = ()
    alignment: int = ALIGNMENT

    @property
    def num_planned(self) -> int:
        return len(self.buffers)

    @property
    def num_unplanned(self) -> int:
        return len(self.unplanned)

    @property
    def num_inplace(self) -> int:
        return sum(1 for b in self.buffers.values() if b.reuses is not None)

    def summary(self) -> dict[str, Any]:
        """The manifest's record of this plan (JSON-ready)."""
        reasons = Counter(self.unplanned.values())
        return {
            "arena_bytes": self.arena_bytes,
            "naive_bytes": self.naive_bytes,
            "live_lower_bound_bytes": self.live_lower_bound_bytes,
            "planned": self.num_planned,
            "unplanned": self.num_unplanned,
            "inplace": self.num_inplace,
            "unplanned_why": dict(sorted(reasons.items())),
        }

    def check(self) -> None:
        """Raise AssertionError unless every buffer is aligned, inside the arena, and disjoint in
        memory from every buffer live at the same time (in-place partners excepted: they share
        on purpose, and overlap in time only at the op that overwrites)."""
        bufs = list(self.buffers.values())
        for b in bufs:
            if b.offset < 0 or b.offset % self.alignment or b.offset + b.size > self.arena_bytes:
                raise AssertionError(f"{b.node}: [{b.offset}, +{b.size}) outside the arena")
            if b.size < b.nbytes:
                raise AssertionError(f"{b.node}: {b.size} bytes reserved for {b.nbytes}")
        unit = _units_by_node(bufs)
        for i, a in enumerate(bufs):
            for b in bufs[i + 1 :]:
                if unit[a.node] == unit[b.node] or a.end < b.start or b.end < a.start:
                    continue
                if a.offset < b.offset + b.size and b.offset < a.offset + a.size:
                    raise AssertionError(
                        f"{a.node} [{a.offset}, +{a.size}) and {b.node} [{b.offset}, +{b.size}) "
                        f"overlap in memory while both live ({a.start}-{a.end}, {b.start}-{b.end})"
                    )


# xllm ops whose `.out` writes into the given memory only on these devices (elsewhere it runs the
# op and copies the result, which costs more than the allocation it saves)
DIRECT_OUT_DEVICES = {"xllm::attention": ("cpu",)}


@torch.no_grad()
def plan_memory(
    graph_module: fx.GraphModule,
    example_args: Sequence[Any],
    alignment: int = ALIGNMENT,
    device: str = "cpu",
) -> MemoryPlan:
    """Plan the activations of `graph_module` called on tensors shaped like `example_args`
    (every placeholder in order: the weights, then the inputs; values are never read, so meta
    tensors do) on `device` (the artifact's). Returns the plan; `plan.check()` holds for it."""
    graph = graph_module.graph
    values = concrete_values(graph_module, example_args)
    roots = storage_groups(graph)
    live = buffer_liveness(graph)
    buffers, unplanned = {}, {}
    for node in graph.nodes:
        if node.op != "call_function" or roots[node] is not node:
            continue  # placeholders, output, and values that share an input's memory
        val = values[node]
        why = _why_not_planned(node, val)
        if why == "no tensor":
            continue
        direct = DIRECT_OUT_DEVICES.get(getattr(getattr(node.target, "_schema", None), "name", ""))
        if not why and direct is not None and device not in direct:
            why = f"out= variant copies on {device}"
        call = None if why else out_call(node, values)
        if call is None:
            unplanned[node.name] = why or "no out= variant"
            continue
        nbytes = val.numel() * val.element_size()
        start, end = live[node]
        size = _align(nbytes, alignment)
        buffers[node.name] = PlannedBuffer(
            node.name, tuple(val.shape), val.dtype, nbytes, size, start, end, call
        )
    _reuse_in_place(graph, roots, live, buffers)
    units = _units(buffers)
    offsets, arena = greedy_by_size([(u[0], u[1], u[2]) for u in units], alignment)
    for (_, _, _, members), offset in zip(units, offsets, strict=True):
        for name in members:
            buffers[name].offset = offset
    plan = MemoryPlan(
        buffers=buffers,
        arena_bytes=arena,
        naive_bytes=sum(b.size for b in buffers.values()),
        live_lower_bound_bytes=max_live_bytes([(u[0], u[1], u[2]) for u in units]),
        unplanned=unplanned,
        guards=_guards(graph, buffers, example_args),
        input_shapes=tuple(
            tuple(a.shape) if isinstance(a, torch.Tensor) else None for a in example_args
        ),
        alignment=alignment,
    )
    return plan


def concrete_values(graph_module: fx.GraphModule, example_args: Sequence[Any]) -> dict:
    """Node -> its value when the graph runs on meta tensors shaped (and strided) like
    `example_args`: concrete sizes for one bucket, no memory, no kernels."""
    meta_args = [_to_meta(a) for a in example_args]
    values: dict[fx.Node, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            values[n] = out = super().run_node(n)
            return out

    Recorder(graph_module).run(*meta_args)
    return values


def greedy_by_size(
    intervals: Sequence[tuple[int, int, int]], alignment: int = ALIGNMENT
) -> tuple[list[int], int]:
    """Offsets for (start, end, size) allocations (lifetimes inclusive) such that allocations
    live at the same time never overlap; returns (offsets in input order, arena bytes).

    Largest first; each takes the best-fitting gap (the smallest that holds it) among the
    placed allocations whose lifetimes overlap its own, else the lowest offset above them all.
    """
    order = sorted(range(len(intervals)), key=lambda i: (-intervals[i][2], intervals[i][0], i))
    offsets = [0] * len(intervals)
    placed: list[tuple[int, int]] = []  # (offset, index), by offset
    arena = 0
    for i in order:
        start, end, size = intervals[i]
        size = _align(size, alignment)
        prev, best, best_gap = 0, None, math.inf
        for offset, j in placed:
            s, e, sz = intervals[j]
            if e < start or end < s:
                continue
            gap = offset - prev
            if size <= gap < best_gap:
                best, best_gap = prev, gap
            prev = max(prev, offset + _align(sz, alignment))
        offsets[i] = prev if best is None else best
        bisect.insort(placed, (offsets[i], i))
        arena = max(arena, offsets[i] + size)
    return offsets, arena


def max_live_bytes(intervals: Sequence[tuple[int, int, int]], alignment: int = ALIGNMENT) -> int:
    """The most bytes live at one index: a lower bound on any placement's arena."""
    events = Counter()
    for start, end, size in intervals:
        events[start] += _align(size, alignment)
        events[end + 1] -= _align(size, alignment)
    peak = live = 0
    for t in sorted(events):
        live += events[t]
        peak = max(peak, live)
    return peak


def out_variant(op) -> tuple[Any, str] | None:
    """(the `.out` overload of ATen op `op`, the name of its one out argument), or None: the
    overload whose non-out arguments match `op`'s (names and types) and whose one out argument
    is the tensor it returns (mm -> mm.out; pow.Tensor_Scalar -> pow.Tensor_Scalar_out)."""
    schema = getattr(op, "_schema", None)
    packet = getattr(op, "overloadpacket", None)
    if schema is None or packet is None or len(schema.returns) != 1:
        return None
    want = [(a.name, str(a.type)) for a in schema.arguments]
    for name in packet.overloads():
        cand = getattr(packet, name)
        outs = [a for a in cand._schema.arguments if a.is_out]
        rest = [(a.name, str(a.type)) for a in cand._schema.arguments if not a.is_out]
        if len(outs) == 1 and rest == want and str(outs[0].type) == "Tensor":
            return cand, outs[0].name
    return None


def out_call(node: fx.Node, values: dict | None = None) -> OutCall | None:
    """How `node` can write into given memory, or None (no `.out` overload)."""
    if node.target is torch.ops.aten.embedding.default and values is not None:
        ids = node.args[1]
        if isinstance(ids, fx.Node) and values[ids].dim() == 1:
            return OutCall(torch.ops.aten.index_select.out, "out", (Arg(0), 0, Arg(1)))
    found = out_variant(node.target)
    return None if found is None else OutCall(*found)


def _why_not_planned(node: fx.Node, val) -> str | None:
    if not isinstance(val, torch.Tensor):
        if isinstance(val, list | tuple) and any(isinstance(v, torch.Tensor) for v in val):
            return "multi-output op"
        return "no tensor"
    if getattr(node.target, "_schema", None) is None:
        return "not an ATen op"
    schema = node.target._schema
    if schema.is_mutable:
        return "mutates an input"
    if not schema.name.startswith(("aten::", "xllm::")):
        return "not an ATen or xllm op"
    if not val.is_contiguous():
        return "non-contiguous result"
    return None


def _reuse_in_place(graph: fx.Graph, roots, live, buffers: dict[str, PlannedBuffer]) -> None:
    """Let a pointwise op write over an input that dies at it: same dtype and shape, planned,
    and no other argument of the op reading the same memory through another view."""
    index = {n: i for i, n in enumerate(graph.nodes)}
    taken = set()
    for node in graph.nodes:
        out = buffers.get(node.name)
        if out is None or torch.Tag.pointwise not in getattr(node.target, "tags", ()):
            continue
        inputs = node.all_input_nodes
        for arg in inputs:
            src = buffers.get(arg.name)
            if src is None or arg.name in taken or roots[arg] is not arg:
                continue
            if live[arg][1] != index[node] or (src.dtype, src.shape) != (out.dtype, out.shape):
                continue
            if any(roots[a] is arg and a is not arg for a in inputs):
                continue  # the op also reads this memory through a view: not elementwise-safe
            out.reuses = arg.name
            taken.add(arg.name)
            break


def _units(buffers: dict[str, PlannedBuffer]) -> list[tuple[int, int, int, list[str]]]:
    """Allocations: chains of in-place reuse share one; (start, end, size, member names)."""
    unit = _units_by_node(list(buffers.values()))
    grouped: dict[str, list[str]] = {}
    for name in buffers:
        grouped.setdefault(unit[name], []).append(name)
    out = []
    for members in grouped.values():
        bs = [buffers[m] for m in members]
        out.append((min(b.start for b in bs), max(b.end for b in bs), bs[0].size, members))
    return out


def _units_by_node(bufs: list[PlannedBuffer]) -> dict[str, str]:
    unit = {}
    for b in bufs:  # graph order: a reused buffer comes before the node reusing it
        unit[b.node] = unit[b.reuses] if b.reuses is not None else b.node
    return unit


def _guards(graph: fx.Graph, buffers, example_args) -> tuple[tuple[int, int, int], ...]:
    """The placeholder dims whose symbols appear in a planned shape (from `meta["val"]`): only
    those must match the plan. Without symbolic metadata, every dim of every tensor input."""
    nodes = {n.name: n for n in graph.nodes}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    symbols, known = set(), True
    for name in buffers:
        val = nodes[name].meta.get("val")
        if not isinstance(val, torch.Tensor):
            known = False
            break
        for d in val.shape:
            if isinstance(d, torch.SymInt):
                symbols |= d.node.expr.free_symbols
    guards = []
    for i, (node, arg) in enumerate(zip(placeholders, example_args, strict=True)):
        if not isinstance(arg, torch.Tensor):
            continue
        val = node.meta.get("val")
        for d, size in enumerate(arg.shape):
            if not known or not isinstance(val, torch.Tensor):
                guards.append((i, d, size))
            elif isinstance(val.shape[d], torch.SymInt):
                if val.shape[d].node.expr.free_symbols & symbols:
                    guards.append((i, d, size))
    return tuple(guards)


def _to_meta(a):
    if not isinstance(a, torch.Tensor):
        return a
    return torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta")


def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment
