"""The `xllm` ONNX function domain (xllm_compile/onnx_functions.py): each op's decomposition,
run by onnxruntime as a one-node model, against the op's reference implementation in kernels/
on random inputs (ragged batches, GQA, sliding windows, both rotary pairings)."""

from __future__ import annotations

import pytest
import torch
from test_attention_ops import make_batch, naive_attention

import xllm_compile.kernels  # noqa: F401
from xllm_compile.kernels.attention import attention_reference
from xllm_compile.kernels.fused_add_rms_norm import fused_add_rms_norm_ref
from xllm_compile.kernels.rms_norm import rms_norm_ref
from xllm_compile.kernels.rotary_embedding import rotary_embedding_ref
from xllm_compile.kernels.silu_and_mul import silu_and_mul_ref
from xllm_compile.kernels.store_kv import store_kv_reference

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import helper  # noqa: E402

from xllm_compile.onnx_export import _onnx_dtype  # noqa: E402
from xllm_compile.onnx_functions import DOMAIN, FUNCTIONS, OPSET  # noqa: E402


def run_function(name: str, inputs: list[torch.Tensor], **attrs) -> list[torch.Tensor]:
    """A model whose one node calls xllm.`name` on graph inputs; checked, then run by ORT."""
    fn = FUNCTIONS[name]()
    assert fn.domain == DOMAIN and fn.name == name
    names = list(fn.input)
    assert len(names) == len(inputs)
    graph_inputs = [
        helper.make_tensor_value_info(n, _onnx_dtype(t.dtype), list(t.shape))
        for n, t in zip(names, inputs, strict=True)
    ]
    # every output has the first input's type and rank (x, q, or the cache for store_kv)
    first = inputs[0]
    outputs = [
        helper.make_tensor_value_info(
            o, _onnx_dtype(first.dtype), [f"{o}_{i}" for i in range(first.dim())]
        )
        for o in fn.output
    ]
    node = helper.make_node(name, names, list(fn.output), domain=DOMAIN, **attrs)
    model = helper.make_model(
        helper.make_graph([node], name, graph_inputs, outputs),
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)],
        functions=[fn],
        ir_version=10,
    )
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {n: t.numpy() for n, t in zip(names, inputs, strict=True)}
    return [torch.from_numpy(o) for o in sess.run(None, feeds)]


def close(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = float((out.float() - ref.float()).abs().max() / ref.float().abs().max())
    assert err < tol, err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norms(dtype):
    torch.manual_seed(0)
    x, res = torch.randn(5, 64).to(dtype), torch.randn(5, 64).to(dtype)
    w = (torch.rand(64) + 0.5).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    (out,) = run_function("rms_norm", [x, w], eps=1e-6)
    close(out, rms_norm_ref(x, w, 1e-6), tol)
    normed, new_res = run_function("fused_add_rms_norm", [x, res, w], eps=1e-5)
    ref_normed, ref_res = fused_add_rms_norm_ref(x, res, w, 1e-5)
    close(normed, ref_normed, tol)
    close(new_res, ref_res, tol)


def test_silu_and_mul_and_linears():
    torch.manual_seed(0)
    gate, up = torch.randn(6, 40), torch.randn(6, 40)
    (out,) = run_function("silu_and_mul", [gate, up])
    close(out, silu_and_mul_ref(gate, up))
    x, w, b = torch.randn(6, 40), torch.randn(24, 40), torch.randn(24)
    (out,) = run_function("linear", [x, w])
    close(out, torch.nn.functional.linear(x, w))
    (out,) = run_function("linear_bias", [x, w, b])
    close(out, torch.nn.functional.linear(x, w, b))


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("half", [False, True])
def test_rotary_embedding(is_neox, half):
    torch.manual_seed(0)
    q, k = torch.randn(7, 4, 16), torch.randn(7, 2, 16)
    width = 8 if half else 16
    cos, sin = torch.randn(7, 1, width), torch.randn(7, 1, width)
    name = "rotary_embedding" + ("" if is_neox else "_interleaved") + ("_half" if half else "")
    q_out, k_out = run_function(name, [q, k, cos, sin])
    q_ref, k_ref = rotary_embedding_ref(q, k, cos, sin, is_neox)
    close(q_out, q_ref)
    close(k_out, k_ref)


def test_store_kv_returns_the_written_cache():
    torch.manual_seed(0)
    cache = torch.randn(3, 2, 4, 16, 2, 8)
    k, v = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    slots, positions = torch.tensor([2, 2, 2, 0, 3]), torch.tensor([4, 5, 6, 9, 0])
    (out,) = run_function("store_kv", [cache, k, v, slots, positions], layer=1)
    ref = cache.clone()
    store_kv_reference(ref, 1, k, v, slots, positions)
    assert torch.equal(out, ref)
    assert not torch.equal(out, cache)  # it wrote something


@pytest.mark.parametrize(
    "query_lens, ctx_before, window",
    [
        ([5, 3], [0, 4], 0),  # ragged prefill, the second sequence with cached context
        ([1, 1, 1], [6, 0, 12], 0),  # a decode batch of three lengths
        ([6, 1], [7, 9], 4),  # a sliding window shorter than the context
    ],
)
def test_attention(query_lens, ctx_before, window):
    args = make_batch(query_lens, ctx_before, window=window)
    q, cache, layer, positions, seq_slots, q_lens, seq_lens, scale, window = args
    (out,) = run_function(
        "attention",
        [q, cache, positions, seq_slots, q_lens, seq_lens],
        layer=layer,
        scale=scale,
        sliding_window=window,
    )
    close(out, attention_reference(*args))
    close(out, naive_attention(*args))
