"""The `xllm::` ops as an ONNX function domain: each op's decomposition into standard ONNX ops
(opset 18), the math of its reference implementation in kernels/ written out node by node.

A model that calls `xllm.rms_norm` carries the function with it (ModelProto.functions): Netron
shows the call and opens its body; onnxruntime inlines it. Scalars of the op schema (eps, layer,
scale, sliding_window) are function attributes; the tensor arguments are its inputs.

    rms_norm(x, weight; eps)                      weight * cast(x32 * rsqrt(mean(x32^2) + eps))
    fused_add_rms_norm(x, residual, weight; eps)  (rms_norm(x + residual), x + residual)
    silu_and_mul(gate, up)                        gate * sigmoid(gate) * up
    linear(x, weight) / linear_bias(.., bias)     x @ weight^T (+ bias)
    rotary_embedding[_interleaved][_half](q, k, cos, sin)
                                                  x * cos + rotate(x) * sin for x in (q, k)
    store_kv(kv_cache, k, v, token_slots, positions; layer) -> kv_cache'
                                                  ScatterND of k and v at [layer, 0|1, slot, pos]
    attention(q, kv_cache, positions, seq_slots, query_lens, seq_lens; layer, scale,
              sliding_window)                     causal (windowed) GQA softmax attention of each
                                                  token over its own sequence's cache rows

ONNX has no in-place update, so `store_kv` (which writes the runtime's cache in place) returns
the updated cache; the exporter threads it to the next op that reads the cache and out of the
graph. `attention` is the capturable form of kernels/attention.py (`prefill_static`): each token
gathers its sequence's rows up to the cache's length and masks those past its position, so one
body serves prefill and decode, at the memory cost tokens x cache length x KV heads x head dim.
Softmax attention runs in fp32 whatever the activation dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper

DOMAIN = "xllm"
OPSET = 18
IMPORTS = [helper.make_opsetid("", OPSET)]


class Builder:
    """Nodes appended in order, each output a fresh name: `b.op("Add", x, y)` -> its output's
    name (a list of names with `outputs=n`)."""

    def __init__(self, prefix: str = "") -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.prefix = prefix
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, domain: str = "", **attrs):
        names = [self.fresh(op_type.lower()) for _ in range(outputs)]
        self.add(op_type, list(inputs), names, domain=domain, **attrs)
        return names[0] if outputs == 1 else names

    def add(self, op_type: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs):
        refs = {k: v for k, v in attrs.items() if isinstance(v, AttrRef)}
        plain = {k: v for k, v in attrs.items() if not isinstance(v, AttrRef)}
        node = helper.make_node(
            op_type, inputs, outputs, name=self.fresh(f"n_{op_type}"), domain=domain, **plain
        )
        for name, ref in refs.items():
            node.attribute.append(ref.proto(name))
        self.nodes.append(node)
        return node

    def const(self, value, dtype=None) -> str:
        """A Constant node holding `value` (numpy dtype `dtype`, default int64)."""
        array = np.asarray(value, dtype=dtype or np.int64)
        return self.op("Constant", value=onnx.numpy_helper.from_array(array))

    def attr_const(self, attr: str, kind: str) -> str:
        """A scalar Constant holding the function attribute `attr` (kind "int" or "float")."""
        return self.op("Constant", **{f"value_{kind}": AttrRef(attr, kind)})

    def dim(self, x: str, axis: int) -> str:
        """x.shape[axis] as an int64 [1]."""
        return self.op("Shape", x, start=axis, end=axis + 1 if axis != -1 else None)

    def scalar(self, one: str) -> str:
        """An int64 [1] as a scalar."""
        return self.op("Squeeze", one, self.const([0]))


class AttrRef:
    """An attribute of a function body node that takes the value of the function's attribute."""

    TYPES = {"int": AttributeProto.INT, "float": AttributeProto.FLOAT}

    def __init__(self, ref: str, kind: str) -> None:
        self.ref, self.kind = ref, kind

    def proto(self, name: str) -> AttributeProto:
        a = AttributeProto()
        a.name, a.ref_attr_name, a.type = name, self.ref, self.TYPES[self.kind]
        return a


def _function(name, inputs, outputs, body: Builder, attributes=()) -> onnx.FunctionProto:
    return helper.make_function(
        DOMAIN, name, inputs, outputs, body.nodes, IMPORTS, attributes=list(attributes)
    )


def _rms(b: Builder, x: str, weight: str) -> str:
    x32 = b.op("Cast", x, to=TensorProto.FLOAT)
    var = b.op("ReduceMean", b.op("Mul", x32, x32), b.const([-1]), keepdims=1)
    inv = b.op("Reciprocal", b.op("Sqrt", b.op("Add", var, b.attr_const("eps", "float"))))
    return b.op("Mul", weight, b.op("CastLike", b.op("Mul", x32, inv), x))


def rms_norm() -> onnx.FunctionProto:
    b = Builder()
    b.add("Identity", [_rms(b, "x", "weight")], ["out"])
    return _function("rms_norm", ["x", "weight"], ["out"], b, ["eps"])


def fused_add_rms_norm() -> onnx.FunctionProto:
    b = Builder()
    b.add("Add", ["x", "residual"], ["residual_out"])
    b.add("Identity", [_rms(b, "residual_out", "weight")], ["out"])
    return _function(
        "fused_add_rms_norm", ["x", "residual", "weight"], ["out", "residual_out"], b, ["eps"]
    )


def silu_and_mul() -> onnx.FunctionProto:
    b = Builder()
    silu = b.op("Mul", "gate", b.op("Sigmoid", "gate"))
    b.add("Mul", [silu, "up"], ["out"])
    return _function("silu_and_mul", ["gate", "up"], ["out"], b)


def linear(bias: bool) -> onnx.FunctionProto:
    b = Builder()
    y = b.op("MatMul", "x", b.op("Transpose", "weight", perm=[1, 0]))
    if bias:
        b.add("Add", [y, "bias"], ["out"])
    else:
        b.add("Identity", [y], ["out"])
    inputs = ["x", "weight", "bias"] if bias else ["x", "weight"]
    return _function("linear_bias" if bias else "linear", inputs, ["out"], b)


def rotary_name(is_neox: bool, half_table: bool) -> str:
    return (
        "rotary_embedding" + ("" if is_neox else "_interleaved") + ("_half" if half_table else "")
    )


def rotary_embedding(is_neox: bool, half_table: bool) -> onnx.FunctionProto:
    """Rotate-half (is_neox) or interleaved pairs; `half_table`: cos/sin hold one angle per
    pair ([..., D/2]) and are widened the way the pairs lie (kernels/rotary_embedding.widen)."""
    b = Builder()

    def with_last(x: str, last: list[int]) -> str:  # x.shape[:-1] + last
        rest = b.op("Shape", x, start=0, end=-1)
        return b.op("Concat", rest, b.const(last), axis=0)

    def widen(table: str) -> str:
        if not half_table:
            return table
        if is_neox:
            return b.op("Concat", table, table, axis=-1)
        pairs = b.op("Unsqueeze", table, b.const([-1]))
        doubled = b.op("Concat", pairs, pairs, axis=-1)
        return b.op("Reshape", doubled, with_last(table, [-1]))

    def rotate(x: str) -> str:
        if is_neox:
            x1, x2 = b.op("Split", x, axis=-1, num_outputs=2, outputs=2)
            return b.op("Concat", b.op("Neg", x2), x1, axis=-1)
        pairs = b.op("Reshape", x, with_last(x, [-1, 2]))
        even, odd = b.op("Split", pairs, axis=-1, num_outputs=2, outputs=2)
        return b.op("Reshape", b.op("Concat", b.op("Neg", odd), even, axis=-1), b.op("Shape", x))

    cos, sin = widen("cos"), widen("sin")
    for x, out in (("q", "q_out"), ("k", "k_out")):
        b.add("Add", [b.op("Mul", x, cos), b.op("Mul", rotate(x), sin)], [out])
    name = rotary_name(is_neox, half_table)
    return _function(name, ["q", "k", "cos", "sin"], ["q_out", "k_out"], b)


def store_kv() -> onnx.FunctionProto:
    b = Builder()
    column = b.op("Concat", b.op("Shape", "token_slots"), b.const([1]), axis=0)  # [T, 1]

    def filled(value: str) -> str:
        return b.op("Expand", b.op("Reshape", value, b.const([1, 1])), column)

    layer = filled(b.attr_const("layer", "int"))
    slots = b.op("Unsqueeze", b.op("Cast", "token_slots", to=TensorProto.INT64), b.const([1]))
    pos = b.op("Unsqueeze", b.op("Cast", "positions", to=TensorProto.INT64), b.const([1]))
    cache = "kv_cache"
    for kind, x in ((0, "k"), (1, "v")):
        index = b.op("Concat", layer, filled(b.const(kind)), slots, pos, axis=1)  # [T, 4]
        out = "kv_cache_out" if kind == 1 else b.fresh("kv_cache")
        b.add("ScatterND", [cache, index, b.op("CastLike", x, "kv_cache")], [out])
        cache = out
    inputs = ["kv_cache", "k", "v", "token_slots", "positions"]
    return _function("store_kv", inputs, ["kv_cache_out"], b, ["layer"])


def attention() -> onnx.FunctionProto:
    b = Builder()
    f32 = TensorProto.FLOAT
    cache = b.op("Gather", "kv_cache", b.attr_const("layer", "int"), axis=0)  # [2, S, M, Hkv, D]
    keys = b.op("Gather", cache, b.const(0), axis=0)  # [S, M, Hkv, D]
    values = b.op("Gather", cache, b.const(1), axis=0)
    # the sequence of each token: how many sequences end at or before it
    t, h, d = b.dim("q", 0), b.dim("q", 1), b.dim("q", 2)
    token = b.op("Range", b.const(0), b.scalar(t), b.const(1))  # [T]
    ends = b.op("CumSum", b.op("Cast", "query_lens", to=TensorProto.INT64), b.const(0))
    before = b.op(
        "LessOrEqual", b.op("Unsqueeze", ends, b.const([0])), b.op("Unsqueeze", token, b.const([1]))
    )
    seq = b.op("ReduceSum", b.op("Cast", before, to=TensorProto.INT64), b.const([1]), keepdims=0)
    slot = b.op("Gather", b.op("Cast", "seq_slots", to=TensorProto.INT64), seq, axis=0)  # [T]
    seq_len = b.op("Gather", b.op("Cast", "seq_lens", to=TensorProto.INT64), seq, axis=0)
    k = b.op("Cast", b.op("Gather", keys, slot, axis=0), to=f32)  # [T, M, Hkv, D]
    v = b.op("Cast", b.op("Gather", values, slot, axis=0), to=f32)
    m, hkv = b.dim(keys, 1), b.dim(keys, 2)
    groups = b.op("Div", h, hkv)
    q = b.op("Reshape", b.op("Cast", "q", to=f32), b.op("Concat", t, hkv, groups, d, axis=0))
    scores = b.op("MatMul", q, b.op("Transpose", k, perm=[0, 2, 3, 1]))  # [T, Hkv, G, M]
    scores = b.op("Mul", scores, b.attr_const("scale", "float"))
    # mask: key rows at or before the token's position, inside its sequence and window
    kpos = b.op("Unsqueeze", b.op("Range", b.const(0), b.scalar(m), b.const(1)), b.const([0]))
    qpos = b.op("Unsqueeze", b.op("Cast", "positions", to=TensorProto.INT64), b.const([1]))
    mask = b.op("LessOrEqual", kpos, qpos)
    mask = b.op("And", mask, b.op("Less", kpos, b.op("Unsqueeze", seq_len, b.const([1]))))
    window = b.attr_const("sliding_window", "int")
    inside = b.op("Greater", kpos, b.op("Sub", qpos, window))
    unwindowed = b.op("LessOrEqual", window, b.const(0))
    mask = b.op("And", mask, b.op("Or", unwindowed, inside))  # [T, M]
    mask = b.op("Unsqueeze", mask, b.const([1, 2]))
    scores = b.op("Where", mask, scores, b.const(-np.inf, np.float32))
    probs = b.op("Softmax", scores, axis=-1)
    out = b.op("MatMul", probs, b.op("Transpose", v, perm=[0, 2, 1, 3]))  # [T, Hkv, G, D]
    b.add("CastLike", [b.op("Reshape", out, b.op("Shape", "q")), "q"], ["out"])
    inputs = ["q", "kv_cache", "positions", "seq_slots", "query_lens", "seq_lens"]
    return _function("attention", inputs, ["out"], b, ["layer", "scale", "sliding_window"])


# function name -> its builder
FUNCTIONS: dict[str, Callable[[], onnx.FunctionProto]] = {
    "rms_norm": rms_norm,
    "fused_add_rms_norm": fused_add_rms_norm,
    "silu_and_mul": silu_and_mul,
    "linear": lambda: linear(bias=False),
    "linear_bias": lambda: linear(bias=True),
    "store_kv": store_kv,
    "attention": attention,
    **{
        rotary_name(neox, half): (lambda neox=neox, half=half: rotary_embedding(neox, half))
        for neox in (True, False)
        for half in (True, False)
    },
}
