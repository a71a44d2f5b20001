"""The Ascend bindings (kernels/npu.py) and the torchair graph builder, with torch_npu and
torchair replaced at the module boundary: a stand-in module whose operators compute their
documented formulas (CANN's operator reference) with torch on the CPU. What this checks is our
side: the argument mapping, layouts, masks, which outputs are kept, and the registry's fallbacks;
nothing here has run on an NPU."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from xllm_compile.kernels import npu, registry
from xllm_compile.kernels.attention import attention_reference
from xllm_compile.kernels.fused_add_rms_norm import fused_add_rms_norm_ref
from xllm_compile.kernels.rms_norm import rms_norm_ref
from xllm_compile.kernels.rotary_embedding import rotary_embedding_ref, rotate_half
from xllm_compile.kernels.silu_and_mul import silu_and_mul_ref
from xllm_compile.kernels.store_kv import store_kv_reference


def _rms(x, gamma, epsilon):
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + epsilon)
    return (x32 * rstd * gamma.float()).to(x.dtype), rstd


def fake_torch_npu(calls: list[str]) -> types.ModuleType:
    m = types.ModuleType("torch_npu")

    def record(fn):
        def wrapped(*args, **kwargs):
            calls.append(fn.__name__)
            return fn(*args, **kwargs)

        wrapped.__name__ = fn.__name__
        setattr(m, fn.__name__, wrapped)
        return wrapped

    @record
    def npu_rms_norm(x, gamma, epsilon=1e-6):
        return _rms(x, gamma, epsilon)

    @record
    def npu_add_rms_norm(x1, x2, gamma, epsilon=1e-6):
        x = x1 + x2
        y, rstd = _rms(x, gamma, epsilon)
        return y, rstd, x

    @record
    def npu_swiglu(x, dim=-1):
        a, b = x.chunk(2, dim=dim)
        return F.silu(a) * b

    @record
    def npu_rotary_mul(x, r1, r2):
        assert x.dim() == 4 and r1.dim() == 4  # the operator takes 4-D operands
        return x * r1 + rotate_half(x) * r2

    @record
    def npu_scatter_nd_update_(var, indices, updates):
        var[tuple(indices.unbind(-1))] = updates
        return var

    @record
    def npu_fused_infer_attention_score(
        query, key, value, *, atten_mask=None, num_heads=1, num_key_value_heads=0,
        scale_value=1.0, input_layout="BSH", **unused,
    ):  # fmt: skip
        assert input_layout == "BSH" and not unused
        b, s, hd = query.shape
        d, kvh = hd // num_heads, num_key_value_heads or num_heads
        q = query.view(b, s, num_heads, d).transpose(1, 2).float()
        k = key.view(b, -1, kvh, d).transpose(1, 2).float()
        v = value.view(b, -1, kvh, d).transpose(1, 2).float()
        k = k.repeat_interleave(num_heads // kvh, 1)
        v = v.repeat_interleave(num_heads // kvh, 1)
        scores = q @ k.transpose(-1, -2) * scale_value
        if atten_mask is not None:  # True: masked out
            scores = scores.masked_fill(atten_mask, float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, hd).to(query.dtype)
        return out, torch.logsumexp(scores, -1)

    return m


@pytest.fixture
def torch_npu(monkeypatch):
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "torch_npu", fake_torch_npu(calls))
    return calls


def close(got, want, tol=1e-5):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert float((got.float() - want.float()).abs().max()) <= tol * float(want.abs().max())


def test_the_registry_binds_torch_npu_when_it_imports(torch_npu):
    impl, skipped = registry.choose("rms_norm", "npu")
    assert impl.name == "torch_npu.npu_rms_norm" and skipped == []
    assert npu.unavailable() is None


def test_norms_and_swiglu(torch_npu):
    torch.manual_seed(0)
    x, r, w = torch.randn(5, 64), torch.randn(5, 64), torch.rand(64) + 0.5
    close(registry.dispatch("rms_norm", "npu", x, w, 1e-6), rms_norm_ref(x, w, 1e-6))
    got = registry.dispatch("fused_add_rms_norm", "npu", x, r, w, 1e-6)
    for a, b in zip(got, fused_add_rms_norm_ref(x, r, w, 1e-6), strict=True):
        close(a, b)
    gate_up = torch.randn(5, 320)
    gate, up = gate_up[:, :160], gate_up[:, 160:]
    close(registry.dispatch("silu_and_mul", "npu", gate, up), silu_and_mul_ref(gate, up))
    assert npu._joined(gate, up).data_ptr() == gate_up.data_ptr()  # the halves read in place
    apart = torch.randn(5, 160)
    close(registry.dispatch("silu_and_mul", "npu", gate, apart), silu_and_mul_ref(gate, apart))
    assert torch_npu == ["npu_rms_norm", "npu_add_rms_norm", "npu_swiglu", "npu_swiglu"]


def test_rotary_binds_rotate_half_and_leaves_the_rest_to_the_reference(torch_npu):
    torch.manual_seed(1)
    q, k = torch.randn(7, 4, 16), torch.randn(7, 2, 16)
    angles = torch.rand(7, 1, 16) * 6
    cos, sin = angles.cos(), angles.sin()
    for got, want in zip(
        registry.dispatch("rotary_embedding", "npu", q, k, cos, sin, True),
        rotary_embedding_ref(q, k, cos, sin, True),
        strict=True,
    ):
        close(got, want)
    assert torch_npu == ["npu_rotary_mul", "npu_rotary_mul"]
    got = registry.dispatch("rotary_embedding", "npu", q, k, cos, sin, False)  # interleaved
    close(got[0], rotary_embedding_ref(q, k, cos, sin, False)[0])
    assert len(torch_npu) == 2  # the reference ran, not the operator


def test_store_kv_and_attention_over_a_contiguous_cache(torch_npu):
    torch.manual_seed(2)
    cache = torch.zeros(2, 2, 3, 40, 2, 16)  # [L, 2, S, M, Hkv, D]; npu runs the contiguous cache
    want = cache.clone()
    slots, pos = torch.tensor([2, 0, 2, 1]), torch.tensor([5, 0, 6, 3])
    k, v = torch.randn(4, 2, 16), torch.randn(4, 2, 16)
    store_kv_reference(want, 1, k, v, slots, pos)
    registry.dispatch("store_kv", "npu", cache, 1, k, v, slots, pos)
    assert torch.equal(cache, want)
    cache.normal_()
    # a ragged prefill: slot 0 from scratch (6 tokens), slot 2 with 10 cached + 5 new; GQA 6:2
    positions = torch.cat([torch.arange(0, 6), torch.arange(10, 15)])
    q = torch.randn(11, 6, 16)
    args = (
        q,
        cache,
        1,
        positions,
        torch.tensor([0, 2]),
        torch.tensor([6, 5]),
        torch.tensor([6, 15]),
    )
    close(
        registry.dispatch("attention", "npu", *args, 0.25, 0), attention_reference(*args, 0.25, 0)
    )
    # a decode step of three sequences
    lens = torch.tensor([7, 30, 1])
    q = torch.randn(3, 6, 16)
    args = (q, cache, 0, lens - 1, torch.tensor([1, 0, 2]), torch.ones(3, dtype=torch.int64), lens)
    close(
        registry.dispatch("attention", "npu", *args, 0.25, 0), attention_reference(*args, 0.25, 0)
    )
    calls = torch_npu.count("npu_fused_infer_attention_score")
    registry.dispatch("attention", "npu", *args, 0.25, 4)  # a sliding window: the reference
    assert torch_npu.count("npu_fused_infer_attention_score") == calls == 5


def test_torchair_builds_one_static_graph_per_bucket(monkeypatch, llama_artifact):
    """The graph cache's torchair builder: torch.compile with torchair's NPU backend, one graph
    per bucket's static shapes (here on the CPU, torchair replaced: its backend records the
    graphs it is given and runs them as they are)."""
    from xllm_compile.runtime import load

    graphs = []
    fake = types.ModuleType("torchair")

    class CompilerConfig:
        pass

    def get_npu_backend(compiler_config=None):
        assert isinstance(compiler_config, CompilerConfig)

        def backend(gm, example_inputs):
            assert all(not isinstance(s, torch.SymInt) for t in example_inputs
                       if isinstance(t, torch.Tensor) for s in t.shape)  # fmt: skip
            graphs.append(gm)
            return gm.forward

        return backend

    fake.CompilerConfig, fake.get_npu_backend = CompilerConfig, get_npu_backend
    monkeypatch.setitem(sys.modules, "torchair", fake)
    prompts = [[1, 5, 9, 11], [1, 7]]
    want = [c.token_ids for c in load(llama_artifact).generate(prompts, max_tokens=6)]
    engine = load(llama_artifact, graph_cache="torchair")
    assert [c.token_ids for c in engine.generate(prompts, max_tokens=6)] == want
    assert engine.runner.stats.builds >= 1 and len(graphs) >= engine.runner.stats.builds
