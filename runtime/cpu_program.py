"""A CPU graph's op sequence as an `xllm::CpuProgram` (kernels/cpu/xllm_program.cpp): the folded
program's nodes, in order, as steps of one C++ loop instead of a TorchScript trace.

Every placeholder and attribute of a folded program is a static tensor (runtime/cpu_graph.py), so
an op's arguments are fixed values but for the results of earlier non-`.out` ops; an `.out` or
in-place op's result is its written argument, static as well. A step keeps the fixed values in
its argument stack and takes the others from slots, released after their last reader.

    program = to_program(folded_gm, args)   # None: a node it cannot run (the trace does)
    outputs = program.run()                 # list of tensors: the program's outputs

Runs what the trace runs: every OpOverload node (none is dropped as dead: an `.out` write
nothing in the graph reads stays), `operator.getitem` of a multi-result op, and, as the trace
does, skips the shape checks (`arena.check_sizes`, an unused `sym_size`) that a bucket's fixed
shapes make true. Anything else (a Python function, a dynamic value inside a list, a constant of
a type the boxed call cannot take) leaves the program to the trace.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import fx

from xllm_compile.runtime.arena import check_sizes

_CONSTANT_TYPES = (bool, int, float, str, type(None), torch.Tensor)


class Unsupported(Exception):
    """A node the program cannot run (the caller keeps the TorchScript trace)."""


def available() -> bool:
    """Whether the kernels' library (with xllm::CpuProgram) is loaded."""
    from xllm_compile.kernels.cpu import ensure_loaded

    if ensure_loaded() is not None:
        return False
    try:
        torch.classes.xllm.CpuProgram  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def to_program(gm: fx.GraphModule, args: Sequence[torch.Tensor], pool: bool = False):
    """`gm` (a folded program: every placeholder and attribute static) on `args` as an
    xllm::CpuProgram, or None where a node is not one it runs. `pool`: replay it on the step
    pool (kernels/cpu/xllm_pool.cpp: the intra-op threads held for the whole replay, the next
    quantized weight prefetched between linears), for steps whose parallel ops are all the
    kernels' own (decode sizes: a prefill's ATen and oneDNN ops would run on one thread)."""
    if not available():
        return None
    try:
        program = _build(gm, args)
    except Unsupported:
        return None
    program.set_pool(pool)
    return program


class _Slot:
    """A value an earlier op returns at run time (slot index in the program)."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


def _build(gm: fx.GraphModule, args: Sequence[torch.Tensor]):
    program = torch.classes.xllm.CpuProgram()
    env: dict[fx.Node, object] = {}  # node -> static tensor, _Slot, tuple of them, or None
    placeholders = iter(args)
    steps: list[tuple] = []  # (name, overload, stack, arg_pos, arg_slot, out_slot)
    last_read: dict[int, int] = {}  # slot -> index of the step that reads it last
    output = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = next(placeholders)
        elif node.op == "get_attr":
            env[node] = _attr(gm, node.target)
        elif node.op == "output":
            output = node.args[0]
        elif node.op == "call_function":
            target = node.target
            if target is check_sizes or (target is torch.ops.aten.sym_size.int and not node.users):
                env[node] = None
            elif target is operator.getitem:
                value = env[node.args[0]]
                if not isinstance(value, tuple):
                    raise Unsupported(node.name)
                env[node] = value[node.args[1]]
            elif isinstance(target, torch._ops.OpOverload):
                env[node] = _step(program, node, env, steps, last_read)
            else:
                raise Unsupported(node.name)
        else:
            raise Unsupported(node.name)
    results = output if isinstance(output, (tuple, list)) else (output,)
    out_slots = []
    for r in results:
        value = env[r] if isinstance(r, fx.Node) else r
        if isinstance(value, _Slot):
            out_slots.append(value.index)
            last_read[value.index] = len(steps)  # kept to the end
        elif isinstance(value, torch.Tensor):
            out_slots.append(program.add_static(value))
        else:
            raise Unsupported("output")
    release: list[list[int]] = [[] for _ in steps]
    for slot, i in last_read.items():
        if i < len(steps):
            release[i].append(slot)
    for step, rel in zip(steps, release, strict=True):
        program.add_step(*step, sorted(rel))
    program.set_outputs(out_slots)
    return program


def _attr(gm: fx.GraphModule, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    if not isinstance(value, torch.Tensor):
        raise Unsupported(target)
    return value


def _step(program, node: fx.Node, env, steps: list, last_read: dict[int, int]):
    schema = node.target._schema
    stack, arg_pos, arg_slot = [], [], []
    positional = list(node.args)
    for i, arg in enumerate(schema.arguments):
        if i < len(positional) and not arg.kwarg_only:
            v = positional[i]
        elif arg.name in node.kwargs:
            v = node.kwargs[arg.name]
        elif arg.has_default_value():
            v = arg.default_value
        else:
            raise Unsupported(f"{node.name}: no value for {arg.name}")
        v = _value(v, env)
        if isinstance(v, _Slot):
            arg_pos.append(i)
            arg_slot.append(v.index)
            last_read[v.index] = len(steps)
            v = None
        stack.append(v)
    out_slot, results = [], []
    for k, ret in enumerate(schema.returns):
        if not isinstance(ret.type, torch.TensorType):
            raise Unsupported(f"{node.name}: returns {ret.type}")
        written = _written_argument(schema, k)
        if written is not None:  # an .out / in-place result: its argument, static or a slot
            value = _value(_argument(node, schema, written), env)
            out_slot.append(-1)
            results.append(value)
        else:
            slot = program.add_slot()
            out_slot.append(slot)
            results.append(_Slot(slot))
    steps.append((str(schema.name), schema.overload_name, stack, arg_pos, arg_slot, out_slot))
    if not results:
        return None
    return results[0] if len(results) == 1 else tuple(results)


def _value(v, env):
    """An argument as the step takes it: a static value, or a _Slot (top level only)."""
    if isinstance(v, fx.Node):
        value = env[v]
        if isinstance(value, tuple):
            raise Unsupported(v.name)
        return value
    if isinstance(v, (list, tuple)):
        items = [_value(x, env) for x in v]
        if any(isinstance(x, _Slot) for x in items):
            raise Unsupported("a run-time value inside a list")
        if not all(isinstance(x, _CONSTANT_TYPES) for x in items):
            raise Unsupported(f"list of {[type(x) for x in items]}")
        return items
    if not isinstance(v, _CONSTANT_TYPES):
        raise Unsupported(f"constant {v!r}")
    return v


def _written_argument(schema, k: int) -> int | None:
    """The argument the schema's k-th result aliases and writes (`Tensor(a!)`), if any."""
    ret = schema.returns[k].alias_info
    if ret is None or not ret.is_write:
        return None
    for i, arg in enumerate(schema.arguments):
        info = arg.alias_info
        if info is not None and info.is_write and info.before_set & ret.before_set:
            return i
    return None


def _argument(node: fx.Node, schema, i: int):
    arg = schema.arguments[i]
    if i < len(node.args) and not arg.kwarg_only:
        return node.args[i]
    return node.kwargs[arg.name]
