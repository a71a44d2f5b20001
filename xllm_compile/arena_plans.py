"""The artifact's activation-arena plans (`arena_plans.json`): for the shape buckets of the graph
cache, where each planned intermediate tensor of the program lives in one arena, and which ATen
`.out` overload writes it there.

The compile driver plans (passes/memory_plan.py) and writes this file; the serving runtime reads
it and builds one arena program per bucket (runtime/arena.py) without importing any pass. This
module is the format both sides share:

    {"format": 1, "graph": "<sha256 of the program's node names and targets>",
     "plans": [{"arena_bytes": 9216, "guards": [[28, 0, 1], [34, 0, 1]],
                "buffers": {"mm_2": {"offset": 0, "shape": [1, 64], "dtype": "float32",
                                     "op": "aten::mm.out", "out": "out", "args": null}, ...}},
               ...]}

A plan serves every call whose inputs satisfy its guards ((placeholder, dim, size): the input
sizes its shapes depend on, e.g. the token count); one file holds one plan per distinct set of
guarded sizes among the buckets, so a plan is never stored twice for buckets that differ only in
sizes it does not depend on (kv length, number of sequences).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from xllm_compile.errors import ArtifactError

__all__ = [
    "FILE",
    "Arg",
    "OutCall",
    "StoredBuffer",
    "StoredPlan",
    "dumps",
    "find_plan",
    "graph_fingerprint",
    "guards_hold",
    "loads",
]

FILE = "arena_plans.json"
FORMAT = 1


@dataclass(frozen=True)
class Arg:
    """In `OutCall.args`: the node's positional argument `index`."""

    index: int
    is_arg = True


@dataclass(frozen=True)
class OutCall:
    """How a planned node writes its result into given memory: `op(*args, **kwargs, out=...)`.
    `args` None: the node's own args and kwargs; else the positional args, each an `Arg` (one of
    the node's) or a constant (embedding(w, ids) -> index_select.out(w, 0, ids): the same kernel
    embedding runs for 1-D ids, while the generated embedding.out allocates and copies)."""

    op: Any
    out: str = "out"
    args: tuple | None = None

    def bind(self, node_args: tuple, node_kwargs: dict, out) -> tuple[tuple, dict]:
        """(args, kwargs) of the out= call for a node called with (node_args, node_kwargs)."""
        if self.args is None:
            return tuple(node_args), {**node_kwargs, self.out: out}
        args = tuple(node_args[a.index] if isinstance(a, Arg) else a for a in self.args)
        return args, {self.out: out}

    def to_json(self) -> dict:
        args = None
        if self.args is not None:
            args = [{"arg": a.index} if isinstance(a, Arg) else _constant(a) for a in self.args]
        return {"op": _op_name(self.op), "out": self.out, "args": args}

    @classmethod
    def of(cls, call) -> OutCall:
        """From a planner's OutCall (duck-typed: op, out, args with `is_arg` markers)."""
        args = call.args
        if args is not None:
            args = tuple(Arg(a.index) if getattr(a, "is_arg", False) else a for a in args)
        return cls(call.op, call.out, args)

    @classmethod
    def from_json(cls, d: dict) -> OutCall:
        args = d["args"]
        if args is not None:
            args = tuple(Arg(a["arg"]) if isinstance(a, dict) else a for a in args)
        return cls(_resolve_op(d["op"]), d["out"], args)


@dataclass(frozen=True)
class StoredBuffer:
    """A planned node's output as the runtime needs it: where, what shape, written by what."""

    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    call: OutCall


@dataclass(frozen=True)
class StoredPlan:
    """One bucket's plan as stored: the subset of passes.memory_plan.MemoryPlan that
    runtime.arena.arena_program reads (`buffers`, `arena_bytes`, `guards`)."""

    buffers: dict[str, StoredBuffer]
    arena_bytes: int
    guards: tuple[tuple[int, int, int], ...]

    @classmethod
    def of(cls, plan) -> StoredPlan:
        """From a MemoryPlan (duck-typed: this module never imports passes)."""
        buffers = {
            name: StoredBuffer(b.offset, tuple(b.shape), b.dtype, OutCall.of(b.call))
            for name, b in plan.buffers.items()
        }
        return cls(buffers, plan.arena_bytes, tuple(tuple(g) for g in plan.guards))

    def to_json(self) -> dict:
        return {
            "arena_bytes": self.arena_bytes,
            "guards": [list(g) for g in self.guards],
            "buffers": {
                name: {
                    "offset": b.offset,
                    "shape": list(b.shape),
                    "dtype": str(b.dtype).removeprefix("torch."),
                    **b.call.to_json(),
                }
                for name, b in self.buffers.items()
            },
        }

    @classmethod
    def from_json(cls, d: dict) -> StoredPlan:
        buffers = {
            name: StoredBuffer(
                int(b["offset"]), tuple(b["shape"]), _dtype(b["dtype"]), OutCall.from_json(b)
            )
            for name, b in d["buffers"].items()
        }
        return cls(buffers, int(d["arena_bytes"]), tuple(tuple(g) for g in d["guards"]))


def graph_fingerprint(graph: fx.Graph) -> str:
    """What a plan is tied to: the node names, kinds and targets of the program, in order."""
    h = hashlib.sha256()
    for node in graph.nodes:
        target = node.target if isinstance(node.target, str) else _op_name(node.target)
        h.update(f"{node.name}|{node.op}|{target}\n".encode())
    return h.hexdigest()


def guards_hold(guards, args: Sequence[Any]) -> bool:
    """Whether input `i`'s dim `d` has size `s` for every guard (i, d, s)."""
    for i, d, size in guards:
        if i >= len(args) or not isinstance(args[i], torch.Tensor) or args[i].dim() <= d:
            return False
        if args[i].shape[d] != size:
            return False
    return True


def find_plan(plans: Sequence[StoredPlan], args: Sequence[Any]) -> StoredPlan | None:
    """The plan for a call with `args` (every placeholder's value, or a tensor of its shape)."""
    return next((p for p in plans if guards_hold(p.guards, args)), None)


def dumps(plans: Sequence[StoredPlan], graph: fx.Graph) -> str:
    body = {
        "format": FORMAT,
        "graph": graph_fingerprint(graph),
        "plans": [p.to_json() for p in plans],
    }
    return json.dumps(body, separators=(",", ":")) + "\n"


def loads(text: str, graph: fx.Graph, where: str = FILE) -> list[StoredPlan]:
    """The plans of a file written by `dumps` for this `graph`.

    Raises:
        ArtifactError: the file is malformed, of another format, or planned for another program.
    """
    try:
        body = json.loads(text)
        fmt, fingerprint = body["format"], body["graph"]
        if fmt != FORMAT:
            raise ArtifactError(f"{where}: arena plan format {fmt}, expected {FORMAT}; recompile")
        if fingerprint != graph_fingerprint(graph):
            raise ArtifactError(
                f"{where}: the arena plans were made for another program (its node names differ "
                "from the loaded one's); recompile the model"
            )
        return [StoredPlan.from_json(p) for p in body["plans"]]
    except ArtifactError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ArtifactError(f"{where} is malformed ({type(e).__name__}: {e}); recompile") from None


def _op_name(op) -> str:
    schema = getattr(op, "_schema", None)
    if schema is None:
        return getattr(op, "__name__", str(op))
    overload = schema.overload_name
    return f"{schema.name}.{overload}" if overload else f"{schema.name}.default"


def _resolve_op(name: str):
    """'aten::mm.out' -> torch.ops.aten.mm.out; ATen and xllm ops only (the runtime imports
    the kernels, which register the xllm ones)."""
    qualified, _, overload = name.rpartition(".")
    namespace, _, op = qualified.partition("::")
    if namespace not in ("aten", "xllm") or not op or not overload:
        raise ValueError(f"not an ATen or xllm overload: {name!r}")
    packet = getattr(getattr(torch.ops, namespace), op)
    return getattr(packet, overload)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _constant(value):
    if not isinstance(value, bool | int | float | str) and value is not None:
        raise TypeError(f"an out= call constant must be JSON-able, got {value!r}")
    return value
