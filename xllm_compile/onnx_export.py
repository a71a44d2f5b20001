"""`xllm-compile ... --emit onnx`: the optimized program as an ONNX model beside the artifact.

The program the runtime runs (the artifact's program.json, as deserialized) is walked node by
node: ATen ops become standard ONNX ops (opset 18), `xllm::` ops become calls into the `xllm`
function domain (onnx_functions.py: each op's decomposition travels inside the model), weights
become initializers stored in one external data file (MODEL_FILE + ".data", so models past
protobuf's 2 GB work and the .onnx itself stays small enough to open in Netron).

The graph's inputs are the program's step inputs (trace.INPUT_NAMES) with their symbolic
dimensions named; its outputs are `logits` [num_logits, vocab] and `kv_cache_out`, the cache
after this step's writes (ONNX has no in-place update: the caller passes it back as `kv_cache`
next step). One sequence prefilling T tokens into cache slot s:

    input_ids [T], positions 0..T-1, token_slots [s]*T, seq_slots [s], query_lens [T],
    seq_lens [T], logits_indices [T-1] (or every row), kv_cache [L, 2, S, M, Hkv, D]

Covered: single-rank programs over float weights (any --dtype; onnxruntime's CPU provider runs
float32 and float16). Refused with a ConfigError before any work: --tp > 1 (collectives) and
quantized matmuls (--quant other than none).
"""

from __future__ import annotations

import logging
import operator
from pathlib import Path
from typing import Any

import torch

from xllm_compile.errors import ConfigError

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
DATA_FILE = MODEL_FILE + ".data"
OUTPUTS = ("logits", "kv_cache_out")
# names of the symbolic dimensions of the step inputs, by input and axis
DIM_NAMES = {
    ("input_ids", 0): "num_tokens",
    ("seq_slots", 0): "num_seqs",
    ("logits_indices", 0): "num_logits",
    ("kv_cache", 2): "kv_slots",
    ("kv_cache", 3): "kv_len",
}
_ALIGN = 64  # byte alignment of each tensor in the data file (lets a reader mmap them)


def check_supported(cfg) -> None:
    """Refuse what the exporter cannot write, before a compile starts."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--emit onnx needs the onnx package: pip install 'xllm-compile[onnx]'"
        ) from None
    if cfg.tp > 1:
        raise ConfigError(
            f"--emit onnx with --tp {cfg.tp}: tensor-parallel programs (collectives) are not "
            "exported; compile with --tp 1"
        )


def check_quant(quant: str) -> None:
    if quant != "none":
        raise ConfigError(
            f"--emit onnx with --quant {quant}: quantized matmuls are not exported yet; add "
            "--quant none (a GGUF is then dequantized)"
        )


def _onnx_dtype(dtype: torch.dtype) -> int:
    from onnx import TensorProto

    table = {
        torch.float32: TensorProto.FLOAT,
        torch.float16: TensorProto.FLOAT16,
        torch.bfloat16: TensorProto.BFLOAT16,
        torch.float64: TensorProto.DOUBLE,
        torch.int64: TensorProto.INT64,
        torch.int32: TensorProto.INT32,
        torch.int8: TensorProto.INT8,
        torch.uint8: TensorProto.UINT8,
        torch.bool: TensorProto.BOOL,
    }
    if dtype not in table:
        raise ConfigError(f"--emit onnx: no ONNX type for {dtype}")
    return table[dtype]


def _bind(node: torch.fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in."""
    schema = node.target._schema
    out = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args) and not arg.kwarg_only:
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            out[arg.name] = None
    return out


def _val(node) -> Any:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


class _Converter:
    """One walk over the program's graph into ONNX nodes."""

    def __init__(self, ep: torch.export.ExportedProgram) -> None:
        from xllm_compile.onnx_functions import Builder

        self.ep = ep
        self.b = Builder()
        self.env: dict[torch.fx.Node, Any] = {}  # node -> name, names, or ("sym", name)
        self.functions: set[str] = set()
        self.kv_node: torch.fx.Node | None = None

    # -- values
    def tensor(self, x, dtype: torch.dtype | None = None) -> str:
        """The ONNX name of argument `x`: a node's value (cast to `dtype` if given and
        different), a SymInt's [1] int64, or a Python number as a constant of `dtype`."""

        if isinstance(x, torch.fx.Node):
            name = self.env[x]
            if isinstance(name, tuple) and name[0] == "sym":
                return name[1] if dtype in (None, torch.int64) else self._cast(name[1], dtype)
            val = _val(x)
            if dtype is not None and isinstance(val, torch.Tensor) and val.dtype != dtype:
                return self._cast(name, dtype)
            return name
        if isinstance(x, (bool, int, float)):
            dtype = dtype or (torch.int64 if isinstance(x, int) else torch.float32)
            return self._scalar(x, dtype)
        raise ConfigError(f"--emit onnx: cannot convert the argument {x!r}")

    def _cast(self, name: str, dtype: torch.dtype) -> str:
        return self.b.op("Cast", name, to=_onnx_dtype(dtype))

    def _scalar(self, value, dtype: torch.dtype) -> str:
        from onnx import helper

        t = helper.make_tensor("value", _onnx_dtype(dtype), [], [value])
        return self.b.op("Constant", value=t)

    def ints(self, values) -> str:
        """An int64 [n] tensor of ints and SymInt nodes (a shape, starts, ends)."""
        if all(isinstance(v, int) for v in values):
            return self.b.const(list(values))
        parts = [
            self.tensor(v) if isinstance(v, torch.fx.Node) else self.b.const([v]) for v in values
        ]
        return self.b.op("Concat", *parts, axis=0)

    def one(self, v) -> str:
        """An int or SymInt as an int64 [1]."""
        return self.tensor(v) if isinstance(v, torch.fx.Node) else self.b.const([v])

    # -- the walk
    def run(self) -> tuple[list, list, list, list[str]]:
        """(graph inputs, outputs, nodes, initializer names in input order)."""
        from onnx import helper

        sig = self.ep.graph_signature
        kinds = {s.arg.name: s for s in sig.input_specs}
        inputs, params = [], []
        for node in self.ep.graph.nodes:
            if node.op == "placeholder":
                spec = kinds[node.name]
                if spec.kind.name == "USER_INPUT":
                    inputs.append(self._value_info(node.name, node))
                    self.env[node] = node.name
                    if node.name == "kv_cache":
                        self.kv_node = node
                else:
                    self.env[node] = spec.target
                    params.append(spec.target)
            elif node.op == "call_function":
                self._call(node)
            elif node.op == "output":
                (logits,) = node.args[0]
                self.b.add("Identity", [self.tensor(logits)], ["logits"])
                self.b.add("Identity", [self.env[self.kv_node]], ["kv_cache_out"])
                outputs = [
                    helper.make_tensor_value_info(
                        "logits", _onnx_dtype(_val(logits).dtype), ["num_logits", "vocab"]
                    ),
                    self._value_info("kv_cache_out", self.kv_node),
                ]
        return inputs, outputs, self.b.nodes, params

    def _value_info(self, name: str, node: torch.fx.Node):
        from onnx import helper

        val = _val(node)
        dims = [
            DIM_NAMES.get((node.name, axis), str(s)) if not isinstance(s, int) else s
            for axis, s in enumerate(val.shape)
        ]
        return helper.make_tensor_value_info(name, _onnx_dtype(val.dtype), dims)

    def _call(self, node: torch.fx.Node) -> None:
        target = node.target
        if target is operator.getitem:
            source, index = node.args
            self.env[node] = self.env[source][index]
            return
        if isinstance(target, torch._ops.OpOverload):
            ns, name = target.namespace, target._schema.name.split("::")[1]
            key = f"{name}.{target._overloadname}"
            if ns == "xllm" and target._overloadname == "default":
                self.env[node] = self._xllm(node, name)
                return
            if ns == "aten" and key in ATEN:
                self.env[node] = ATEN[key](self, node, _bind(node))
                return
        raise ConfigError(
            f"--emit onnx: no ONNX conversion for {target} (node {node.name}); "
            "compile without --emit onnx, or report the op"
        )

    # -- xllm ops: function calls
    def _xllm(self, node: torch.fx.Node, name: str):
        from xllm_compile.onnx_functions import DOMAIN, rotary_name

        args = _bind(node)
        out_vals = _val(node)
        n_out = len(out_vals) if isinstance(out_vals, (tuple, list)) else 1
        attrs: dict[str, Any] = {}
        if name in ("rms_norm", "fused_add_rms_norm"):
            tensors = (
                ["x", "residual", "weight"] if name == "fused_add_rms_norm" else ["x", "weight"]
            )
            attrs["eps"] = float(args["eps"])
            fn = name
        elif name == "silu_and_mul":
            tensors, fn = ["gate", "up"], name
        elif name == "linear":
            has_bias = args["bias"] is not None
            tensors = ["x", "weight", "bias"] if has_bias else ["x", "weight"]
            fn = "linear_bias" if has_bias else "linear"
        elif name == "rotary_embedding":
            q, cos = _val(args["q"]), _val(args["cos"])
            d = q.shape[-1]
            half = d % 2 == 0 and cos.shape[-1] == d // 2
            tensors, fn = ["q", "k", "cos", "sin"], rotary_name(bool(args["is_neox"]), half)
        elif name == "store_kv":
            tensors = ["kv_cache", "k", "v", "token_slots", "positions"]
            attrs["layer"] = int(args["layer"])
            fn = name
        elif name == "attention":
            tensors = ["q", "kv_cache", "positions", "seq_slots", "query_lens", "seq_lens"]
            attrs = {
                "layer": int(args["layer"]),
                "scale": float(args["scale"]),
                "sliding_window": int(args["sliding_window"]),
            }
            fn = name
        else:
            raise ConfigError(
                f"--emit onnx: the op xllm::{name} has no ONNX decomposition yet (node "
                f"{node.name}); compile without --emit onnx"
            )
        inputs = [self._xllm_input(node, args[t]) for t in tensors]
        self.functions.add(fn)
        if name == "store_kv":  # the cache's new version replaces the old for later readers
            out = self.b.fresh("kv_cache")
            self.b.add(fn, inputs, [out], domain=DOMAIN, **attrs)
            self.env[self.kv_node] = out
            return None
        outs = [self.b.fresh(f"{node.name}_{i}") for i in range(n_out)]
        self.b.add(fn, inputs, outs, domain=DOMAIN, **attrs)
        return outs if isinstance(out_vals, (tuple, list)) else outs[0]

    def _xllm_input(self, node: torch.fx.Node, x) -> str:
        if x is self.kv_node:
            return self.env[self.kv_node]  # the latest version
        out = _val(node)
        first = out[0] if isinstance(out, (tuple, list)) else out
        val = _val(x)
        if (
            isinstance(val, torch.Tensor)
            and isinstance(first, torch.Tensor)
            and val.is_floating_point()
            and first.is_floating_point()
            and val.dtype != first.dtype
        ):
            raise ConfigError(
                f"--emit onnx: {node.target} mixes {val.dtype} and {first.dtype} inputs (node "
                f"{node.name}); its ONNX function takes one float type"
            )
        return self.tensor(x)


# -- ATen ops ------------------------------------------------------------------------------------


def _elementwise(onnx_op: str):
    def convert(c: _Converter, node, a):
        dtype = _val(node).dtype
        x = c.tensor(a["self"], dtype)
        y = c.tensor(a["other"], dtype)
        alpha = a.get("alpha", 1)
        if alpha not in (None, 1):
            y = c.b.op("Mul", y, c.tensor(alpha, dtype))
        return c.b.op(onnx_op, x, y)

    return convert


def _unary(*ops: str):
    def convert(c: _Converter, node, a):
        x = c.tensor(a["self"])
        for op in ops:
            x = c.b.op(op, x)
        return x

    return convert


def _silu(c, node, a):
    x = c.tensor(a["self"])
    return c.b.op("Mul", x, c.b.op("Sigmoid", x))


def _pow(c, node, a):
    dtype = _val(node).dtype
    return c.b.op("Pow", c.tensor(a["self"], dtype), c.tensor(a["exponent"], dtype))


def _mean(c, node, a):
    dims = a["dim"]
    x = c.tensor(a["self"], a["dtype"]) if a["dtype"] is not None else c.tensor(a["self"])
    keep = int(bool(a["keepdim"]))
    if not dims:
        return c.b.op("ReduceMean", x, keepdims=keep)
    return c.b.op("ReduceMean", x, c.b.const(list(dims)), keepdims=keep)


def _to(c, node, a):
    return c.b.op("Cast", c.tensor(a["self"]), to=_onnx_dtype(a["dtype"]))


def _to_copy(c, node, a):
    if a.get("dtype") is None:
        return c.b.op("Identity", c.tensor(a["self"]))
    return _to(c, node, a)


def _identity(c, node, a):
    return c.b.op("Identity", c.tensor(a["self"]))


def _embedding(c, node, a):
    return c.b.op("Gather", c.tensor(a["weight"]), c.tensor(a["indices"]), axis=0)


def _index(c, node, a):
    picks = [(d, i) for d, i in enumerate(a["indices"]) if i is not None]
    if len(picks) != 1:
        raise ConfigError(
            f"--emit onnx: aten.index with {len(picks)} index tensors (node {node.name}) is not "
            "converted; only one"
        )
    d, index = picks[0]
    return c.b.op("Gather", c.tensor(a["self"]), c.tensor(index), axis=d)


def _unsqueeze(c, node, a):
    return c.b.op("Unsqueeze", c.tensor(a["self"]), c.b.const([a["dim"]]))


def _reshape(c, node, a):
    return c.b.op("Reshape", c.tensor(a["self"]), c.ints(a.get("size", a.get("shape"))))


def _slice(c, node, a):
    start = 0 if a["start"] is None else a["start"]
    end = torch.iinfo(torch.int64).max if a["end"] is None else a["end"]
    return c.b.op(
        "Slice",
        c.tensor(a["self"]),
        c.one(start),
        c.one(end),
        c.b.const([a["dim"]]),
        c.one(a["step"]),
    )


def _cat(c, node, a):
    dtype = _val(node).dtype
    return c.b.op("Concat", *[c.tensor(t, dtype) for t in a["tensors"]], axis=a["dim"])


def _transpose(c, node, a):
    rank = len(_val(a["self"]).shape)
    perm = list(range(rank))
    d0, d1 = a["dim0"] % rank, a["dim1"] % rank
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return c.b.op("Transpose", c.tensor(a["self"]), perm=perm)


def _permute(c, node, a):
    rank = len(_val(a["self"]).shape)
    return c.b.op("Transpose", c.tensor(a["self"]), perm=[d % rank for d in a["dims"]])


def _linear(c, node, a):
    y = c.b.op(
        "MatMul", c.tensor(a["input"]), c.b.op("Transpose", c.tensor(a["weight"]), perm=[1, 0])
    )
    return y if a["bias"] is None else c.b.op("Add", y, c.tensor(a["bias"]))


def _sym_size(c, node, a):
    d = a["dim"]
    return ("sym", c.b.op("Shape", c.tensor(a["self"]), start=d, end=d + 1 if d != -1 else None))


ATEN = {
    "add.Tensor": _elementwise("Add"),
    "sub.Tensor": _elementwise("Sub"),
    "mul.Tensor": _elementwise("Mul"),
    "div.Tensor": _elementwise("Div"),
    "add.Scalar": _elementwise("Add"),
    "mul.Scalar": _elementwise("Mul"),
    "neg.default": _unary("Neg"),
    "rsqrt.default": _unary("Sqrt", "Reciprocal"),
    "sqrt.default": _unary("Sqrt"),
    "exp.default": _unary("Exp"),
    "sigmoid.default": _unary("Sigmoid"),
    "tanh.default": _unary("Tanh"),
    "silu.default": _silu,
    "pow.Tensor_Scalar": _pow,
    "mean.dim": _mean,
    "to.dtype": _to,
    "_to_copy.default": _to_copy,
    "clone.default": _identity,
    "contiguous.default": _identity,
    "alias.default": _identity,
    "embedding.default": _embedding,
    "index.Tensor": _index,
    "unsqueeze.default": _unsqueeze,
    "view.default": _reshape,
    "reshape.default": _reshape,
    "_unsafe_view.default": _reshape,
    "slice.Tensor": _slice,
    "cat.default": _cat,
    "transpose.int": _transpose,
    "permute.default": _permute,
    "linear.default": _linear,
    "sym_size.int": _sym_size,
}


# -- writing -------------------------------------------------------------------------------------


def _initializer(name: str, tensor: torch.Tensor, data, offset: int):
    """A TensorProto whose bytes live in `data` at `offset` (external data); returns it and the
    next offset."""
    from onnx import TensorProto

    t = TensorProto()
    t.name = name
    t.data_type = _onnx_dtype(tensor.dtype)
    t.dims.extend(tensor.shape)
    raw = tensor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy()
    pad = -offset % _ALIGN
    data.write(b"\0" * pad)
    offset += pad
    data.write(memoryview(raw))
    t.data_location = TensorProto.EXTERNAL
    for key, value in (
        ("location", DATA_FILE),
        ("offset", str(offset)),
        ("length", str(raw.nbytes)),
    ):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t, offset + raw.nbytes


def export(
    ep: torch.export.ExportedProgram, weights: dict[str, torch.Tensor], out_dir: Path
) -> dict:
    """Write MODEL_FILE and DATA_FILE into `out_dir`; returns the manifest's `onnx` entry."""
    import onnx
    from onnx import helper

    from xllm_compile.onnx_functions import DOMAIN, FUNCTIONS, OPSET

    conv = _Converter(ep)
    inputs, outputs, nodes, params = conv.run()
    initializers, offset = [], 0
    with open(out_dir / DATA_FILE, "wb") as data:
        for name in dict.fromkeys(params):
            tensor = weights.get(name)
            if tensor is None:
                tensor = ep.constants.get(name)
            if tensor is None:
                raise ConfigError(f"--emit onnx: no tensor for the program's input {name!r}")
            t, offset = _initializer(name, tensor, data, offset)
            initializers.append(t)
    graph = helper.make_graph(nodes, "xllm_step", inputs, outputs, initializer=initializers)
    functions = [FUNCTIONS[name]() for name in sorted(conv.functions)]
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)],
        functions=functions,
        producer_name="xllm-compile",
        ir_version=10,
    )
    onnx.save_model(model, out_dir / MODEL_FILE)
    onnx.checker.check_model(str(out_dir / MODEL_FILE), full_check=True)
    return {
        "file": MODEL_FILE,
        "data": DATA_FILE,
        "opset": OPSET,
        "domain": DOMAIN,
        "functions": sorted(conv.functions),
        "inputs": [i.name for i in inputs],
        "outputs": list(OUTPUTS),
        "nodes": len(nodes),
    }
