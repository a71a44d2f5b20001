"""The program file: torch.export's JSON schema of the optimized program, read without pickle.

`torch.export.load` of a `.pt2` archive unpickles parts of it (sample inputs, pickled tensors and
constants, with a `weights_only=False` fallback), so a rewritten archive runs code on load. The
artifact instead stores the schema's JSON (`program.json`); tensor constants, if a program has
any, go to safetensors. Reading checks the document before torch sees it, since the
deserializer has string-driven paths of its own: sympy's `sympify` (an `eval`) on every shape
expression, node metadata naming Python types, guard code, custom objects and extension ops.

    check(doc)  every op an allowed ATen / xllm / collective overload or operator.getitem and
                friends; every name an identifier; every shape expression sympy constructors
                over s<N> symbols only; no custom objects, no subgraphs. Node metadata and
                guard code are dropped (nothing at run time reads them).

Shared by the compile driver (writer) and the runtime (reader); it imports neither.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from xllm_compile.errors import ArtifactError

FILE = "program.json"
CONSTANTS_FILE = "constants.safetensors"

# Namespaces of the ops a program may call: ATen (and its prims), ours, functional collectives.
OP_NAMESPACES = frozenset({"aten", "prims", "xllm", "_c10d_functional"})
PYTHON_OPS = frozenset(
    f"_operator.{name}"
    for name in ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow")
    + ("eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_")
) | frozenset(f"torch.{name}" for name in ("sym_max", "sym_min", "sym_not", "sym_float"))
_OP_TARGET = re.compile(r"torch\.ops\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FQN = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
# Shape expressions as torch writes them: Mul(Integer(128), Symbol('s91', positive=True, ...)).
_SYMBOL_NAME = re.compile(r"'[a-z]+\d+'")
_EXPR_CHARS = re.compile(r"[A-Za-z0-9_(),=\s+*/\-]*")
# No powers (Pow(Integer(10), Integer(10**18)) would compute for ever) and no number past int64.
_LONG_NUMBER = re.compile(r"\d{20}")
_EXPR_WORDS = frozenset(
    {"Symbol", "Integer", "Mul", "Add", "Mod", "Rational", "Max", "Min", "Abs"}
    | {"FloorDiv", "ModularIndexing", "CleanDiv", "CeilDiv", "CeilToInt", "FloorToInt"}
    | {"PythonMod", "Where", "IntTrueDiv", "TruncToInt", "Identity"}
    | {"True", "False", "positive", "integer", "nonnegative", "negative", "real", "finite"}
)


def dumps(ep: torch.export.ExportedProgram) -> bytes:
    """The program's schema JSON (no weights, constants or example inputs inside)."""
    from torch._export.serde import serialize as serde

    art = serde.serialize(
        ep, serialize_state_dict=False, serialize_constants=False, serialize_example_inputs=False
    )
    return art.exported_program


def tensor_constants(ep: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """The program's lifted tensor constants (stored in CONSTANTS_FILE); other kinds refused."""
    out = {}
    for name, value in ep.constants.items():
        if not isinstance(value, torch.Tensor):
            raise ArtifactError(f"the program holds a {type(value).__name__} constant {name!r}")
        out[name] = value.contiguous()
    return out


def loads(
    data: bytes, constants: dict[str, torch.Tensor] | None = None, where: str = FILE
) -> torch.export.ExportedProgram:
    """Check and deserialize a program document. Parameters and buffers come back as meta
    tensors (the runtime binds the weights itself).

    Raises:
        ArtifactError: naming `where`, when the document is not JSON, fails `check`, or torch
            cannot rebuild a program from it.
    """
    from torch._export.serde import schema
    from torch._export.serde import serialize as serde

    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{where}: not a program document ({e}); recompile") from None
    check(doc, where)
    _strip(doc)
    try:
        program = serde._dict_to_dataclass(schema.ExportedProgram, doc)
        state = _placeholders(doc, serde)
        return serde.ExportedProgramDeserializer().deserialize(
            program, state, dict(constants or {}), None
        )
    except Exception as e:  # torch raises many types for a document it cannot rebuild
        raise ArtifactError(
            f"{where}: torch {torch.__version__} cannot rebuild the program "
            f"({type(e).__name__}: {e}); recompile the model with this version"
        ) from None


def load(path: Path, constants: dict[str, torch.Tensor] | None = None) -> torch.fx.GraphModule:
    """The program at `path` as a GraphModule (see `loads`)."""
    return loads(path.read_bytes(), constants, where=str(path)).graph_module


def check(doc: Any, where: str = FILE) -> None:
    """Refuse a document that could make the deserializer run anything but our ops.

    Raises:
        ArtifactError: naming the first offending op, name or expression.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("graph_module"), dict):
        raise ArtifactError(f"{where}: not a program document; recompile")
    graph = doc["graph_module"].get("graph")
    if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list):
        raise ArtifactError(f"{where}: the program has no graph; recompile")
    if graph.get("custom_obj_values"):
        raise ArtifactError(f"{where}: the program holds custom objects, which are refused")
    for node in graph["nodes"]:
        target = node.get("target") if isinstance(node, dict) else None
        if not _allowed_target(target):
            raise ArtifactError(f"{where}: the program calls {target!r}, which is not allowed")
    _walk(doc, where)


def _allowed_target(target: Any) -> bool:
    if not isinstance(target, str):
        return False
    if target in PYTHON_OPS:
        return True
    m = _OP_TARGET.fullmatch(target)
    return bool(m) and m.group(1) in OP_NAMESPACES


def _walk(value: Any, where: str, key: str = "") -> None:
    """Every name an identifier (or a dotted parameter path), every expression safe, and no
    argument kind that carries code or a subgraph."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k in ("as_graph", "as_custom_obj", "as_custom_objs", "as_operator"):
                raise ArtifactError(f"{where}: the program holds a {k[3:]} argument (refused)")
            if k == "metadata":
                continue  # dropped before deserializing
            _walk(v, where, k)
    elif isinstance(value, list):
        for v in value:
            _walk(v, where, key)
    elif isinstance(value, str):
        if key in ("name", "as_name") and not _IDENTIFIER.fullmatch(value):
            raise ArtifactError(f"{where}: bad value name {value[:60]!r}")
        if key in ("target", "parameter_name", "buffer_name") and not (
            _FQN.fullmatch(value) or _allowed_target(value)
        ):
            raise ArtifactError(f"{where}: bad target {value[:60]!r}")
        if key == "expr_str" and not _safe_expression(value):
            raise ArtifactError(f"{where}: bad shape expression {value[:60]!r}")


def _safe_expression(text: str) -> bool:
    """Only sympy constructors over quoted symbol names: no attribute access, subscripts,
    strings or names that sympify's eval could turn into a call of anything else."""
    rest = _SYMBOL_NAME.sub("", text)
    if not _EXPR_CHARS.fullmatch(rest) or _LONG_NUMBER.search(rest):
        return False
    return all(w in _EXPR_WORDS for w in _IDENTIFIER.findall(rest) if not w[0].isdigit())


def _strip(doc: dict) -> None:
    """Drop what only debugging reads: node metadata (stack traces, module stacks naming Python
    types), the graph's custom metadata and the guard code."""
    for node in doc["graph_module"]["graph"]["nodes"]:
        node["metadata"] = {}
    doc["graph_module"]["metadata"] = {}
    doc["guards_code"] = []


def _placeholders(doc: dict, serde) -> dict[str, torch.Tensor]:
    """Meta tensors standing in for the parameters and buffers the signature names."""
    values = doc["graph_module"]["graph"]["tensor_values"]
    out: dict[str, torch.Tensor] = {}
    for spec in doc["graph_module"]["signature"]["input_specs"]:
        kind, body = next(iter(spec.items()))
        if kind not in ("parameter", "buffer") or body.get("persistent") is False:
            continue  # a non-persistent buffer is a constant (CONSTANTS_FILE), not state
        meta = values[body["arg"]["name"]]
        shape = [s["as_int"] for s in meta["sizes"]]
        dtype = serde._SERIALIZE_TO_TORCH_DTYPE[serde.ScalarType(meta["dtype"])]
        t = torch.empty(shape, dtype=dtype, device="meta")
        name = body["parameter_name" if kind == "parameter" else "buffer_name"]
        out[name] = torch.nn.Parameter(t, requires_grad=False) if kind == "parameter" else t
    return out


def bind_group(gm: torch.fx.GraphModule, group_name: str) -> int:
    """Point every op in `gm` that names a process group (functional collectives, and xllm::
    ops that run one, by their `group_name` argument) at `group_name` (the name traced or saved
    is a placeholder: c10d names groups per process). Returns how many."""
    count = 0
    for node in gm.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        names = [a.name for a in target._schema.arguments]
        if "group_name" in names:
            i = names.index("group_name")
            if i < len(node.args):
                node.args = (*node.args[:i], group_name, *node.args[i + 1 :])
            else:
                node.kwargs = {**node.kwargs, "group_name": group_name}
            count += 1
    if count:
        gm.recompile()
    return count
