"""The Triton kernels (kernels/triton/) against the references, on the CPU under Triton's
interpreter (TRITON_INTERPRET=1, set by conftest.py where no GPU is): many shapes, fp32 within
1e-5 and bf16 within 2e-2 relative, ragged batches, GQA, sliding windows, and KV in a real page
pool view whose sequences cross page boundaries.

The interpreter copies each tensor argument's whole storage to the host and back, so the page
pool views here have every page of their reservation mapped (each slot allocated at its full
length; pages shuffled so that neighbours in a range are not neighbours in the memfd): reading
an unmapped page would fault, as it would on the device."""

from __future__ import annotations

import random

import pytest
import torch

from xllm_compile.kernels.attention import attention_reference
from xllm_compile.kernels.cuda.bindings import OPS as CUDA_OPS
from xllm_compile.kernels.fused_add_rms_norm import fused_add_rms_norm_ref
from xllm_compile.kernels.rms_norm import rms_norm_ref
from xllm_compile.kernels.rotary_embedding import rotary_embedding_ref
from xllm_compile.kernels.silu_and_mul import silu_and_mul_ref
from xllm_compile.kernels.store_kv import store_kv_reference
from xllm_compile.kernels.triton import attention as tt_attention
from xllm_compile.kernels.triton import norm, rotary, silu_and_mul, store_kv
from xllm_compile.runtime.page_pool import make_page_pool
from xllm_compile.runtime.paged_kv_cache import KVGeometry, PagedKVCache

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16]


def close(got: torch.Tensor, want: torch.Tensor, dtype) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    err = float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-6))
    assert err <= TOL[dtype], err


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (7, 96), (3, 5, 130), (16, 576)])
def test_rms_norms(shape, dtype):
    torch.manual_seed(0)
    x, r = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    w = (1 + 0.1 * torch.randn(shape[-1])).to(dtype)
    close(norm.rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), dtype)
    got, got_res = norm.fused_add_rms_norm(x, r, w, 1e-5)
    want, want_res = fused_add_rms_norm_ref(x, r, w, 1e-5)
    close(got, want, dtype)
    # fp32: the same sum; bf16: the interpreter casts fp32 -> bf16 by truncation (a GPU rounds to
    # nearest), one ulp apart at most
    close(got_res, want_res, dtype)
    if dtype == torch.float32:
        assert torch.equal(got_res, want_res)
    wide = torch.randn(shape[0], 2 * shape[-1], dtype=dtype) if len(shape) == 2 else None
    if wide is not None:  # a strided view (a row stride of twice the width)
        half = wide[:, : shape[-1]]
        close(norm.rms_norm(half, w, 1e-6), rms_norm_ref(half, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,width", [(1, 160), (5, 1536), (9, 33)])
def test_silu_and_mul_on_the_halves_of_a_merged_matmul(rows, width, dtype):
    torch.manual_seed(1)
    gate_up = torch.randn(rows, 2 * width, dtype=dtype) * 3
    gate, up = gate_up[:, :width], gate_up[:, width:]  # strided views, read in place
    close(silu_and_mul.silu_and_mul(gate, up), silu_and_mul_ref(gate, up), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("half_table", [False, True])
@pytest.mark.parametrize(
    "tokens,heads,kv_heads,dim", [(1, 4, 2, 16), (11, 14, 2, 64), (5, 3, 1, 24)]
)
def test_rotary_embedding(tokens, heads, kv_heads, dim, is_neox, half_table, dtype):
    torch.manual_seed(2)
    q = torch.randn(tokens, heads, dim, dtype=dtype)
    k = torch.randn(tokens, kv_heads, dim, dtype=dtype)
    angles = torch.rand(tokens, 1, dim // 2 if half_table else dim) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    assert rotary.supports(q, k, cos, sin) is None
    got, want = (
        rotary.rotary_embedding(q, k, cos, sin, is_neox),
        rotary_embedding_ref(q, k, cos, sin, is_neox),
    )
    close(got[0], want[0], dtype)
    close(got[1], want[1], dtype)


def paged_cache(dtype, num_slots=4, max_len=96, layout="token_major", **geometry):
    """A real page-pool KV cache (2 layers, 2 KV heads of 16 unless told; 4 KiB pages: token-major
    a page holds 16 fp32 / 32 bf16 tokens, so the sequences below cross pages) with every slot
    allocated at max_len, each slot's pages taken from a shuffled free list. Returns the cache
    and its slots."""
    g = dict(num_layers=2, num_kv_heads=2, head_dim=16) | geometry
    g = KVGeometry(g["num_layers"], num_slots, max_len, g["num_kv_heads"], g["head_dim"], dtype)
    pool = make_page_pool("cpu", 4096, 512)
    random.Random(0).shuffle(pool._free)
    cache = PagedKVCache(pool, g, layout)
    return cache, [cache.allocate(max_len) for _ in range(num_slots)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["token_major", "layer_major"])
def test_store_kv_writes_through_the_page_pools_strides(dtype, layout):
    cache, slots = paged_cache(dtype, num_slots=3, layout=layout)
    torch.manual_seed(3)
    slot_of = torch.tensor([slots[i % 3] for i in range(40)])
    pos = torch.tensor([(7 * i) % 70 for i in range(40)])
    k, v = torch.randn(40, 2, 16, dtype=dtype), torch.randn(40, 2, 16, dtype=dtype)
    want = cache.tensor.clone()
    store_kv_reference(want, 1, k, v, slot_of, pos)
    store_kv.store_kv(cache.tensor, 1, k, v, slot_of, pos)
    assert torch.equal(cache.tensor, want)


def fill(cache: PagedKVCache, slots: list[int], lens: list[int]) -> None:
    g = cache.geometry
    for s, n in zip(slots, lens, strict=True):
        shape = (g.num_layers, 2, n, g.num_kv_heads, g.head_dim)
        cache.tensor[:, :, s, :n] = torch.randn(shape).to(g.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [0, 9])
@pytest.mark.parametrize("heads", [2, 6])  # MHA and GQA (3 query heads a KV head)
def test_decode_attention_ragged_over_pages(heads, window, dtype):
    torch.manual_seed(4)
    cache, slots = paged_cache(dtype)
    lens = [1, 17, 40, 77]  # 77 fp32 tokens: five 16-token pages
    fill(cache, slots, lens)
    slots = torch.tensor(slots)
    q = torch.randn(4, heads, 16, dtype=dtype)
    seq_lens = torch.tensor(lens)
    args = (q, cache.tensor, 1, seq_lens - 1, slots, torch.ones(4, dtype=torch.int64), seq_lens)
    got = tt_attention.attention(*args, 0.25, window)
    close(got, attention_reference(*args, 0.25, window), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [0, 5])
def test_prefill_attention_ragged_with_cached_context(window, dtype):
    """Three sequences in one ragged prefill: one from scratch, two with cached context (a chunk
    or a shared prefix before them), KV crossing page boundaries."""
    torch.manual_seed(5)
    cache, slots = paged_cache(dtype, num_slots=3)
    cached, new = [0, 20, 33], [9, 14, 30]
    lens = [c + n for c, n in zip(cached, new, strict=True)]
    fill(cache, slots, lens)
    slots = torch.tensor(slots)
    positions = torch.cat([torch.arange(c, c + n) for c, n in zip(cached, new, strict=True)])
    q = torch.randn(int(positions.numel()), 6, 16, dtype=dtype)
    args = (q, cache.tensor, 0, positions, slots, torch.tensor(new), torch.tensor(lens))
    got = tt_attention.attention(*args, 0.25, window)
    close(got, attention_reference(*args, 0.25, window), dtype)


def test_random_attention_shapes_match_the_reference():
    """Random batches (sizes, lengths, heads, dims) in fp32."""
    rng = random.Random(6)
    for trial in range(6):
        dim = rng.choice([8, 16, 32, 48])
        kv_heads = rng.choice([1, 2])
        heads = kv_heads * rng.choice([1, 2, 4])
        lens = [rng.randint(1, 60) for _ in range(rng.randint(1, 4))]
        geometry = dict(num_layers=1, num_kv_heads=kv_heads, head_dim=dim)
        cache, slots = paged_cache(torch.float32, len(lens), 64, **geometry)
        fill(cache, slots, lens)
        slots = torch.tensor(slots)
        q = torch.randn(len(lens), heads, dim)
        seq_lens = torch.tensor(lens)
        args = (q, cache.tensor, 0, seq_lens - 1, slots, torch.ones(len(lens), dtype=torch.int64))
        window = rng.choice([0, 0, 7])
        got = tt_attention.attention(*args, seq_lens, dim**-0.5, window)
        want = attention_reference(*args, seq_lens, dim**-0.5, window)
        close(got, want, torch.float32), trial


def through_the_cuda_kernels(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, dict]:
    """A copy of `gm` whose xllm:: ops call what the registry runs on CUDA (the Triton kernels,
    here under the interpreter on CPU tensors), and a count of the calls."""
    import copy

    from xllm_compile.kernels import registry

    calls: dict[str, int] = {}

    def kernel(name):
        def call(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return registry.dispatch(name, "cuda", *args, **kwargs)

        call.__name__ = f"cuda_{name}"
        return call

    gm = copy.deepcopy(gm)
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        name = schema.name.removeprefix("xllm::") if schema is not None else None
        if node.op == "call_function" and name in CUDA_OPS:
            node.target = kernel(name)
    gm.recompile()
    return gm, calls


def test_a_model_through_the_triton_kernels_equals_its_cpu_run(llama_artifact):
    """The llama test model's program with every xllm:: op on its CUDA implementation (the
    registry's first choice: Triton): a ragged prefill with cached context, then decode steps,
    equal to the CPU kernels' run."""
    from xllm_compile.runtime import load
    from xllm_compile.runtime.model_runner import ModelRunner

    from helpers import prefill_then_decode, rel_err

    # the interpreter copies the whole cache each call: a contiguous one (every byte mapped)
    engine = load(llama_artifact, kv_cache="contiguous", max_num_seqs=2)
    prompt, continuation = [1, 17, 93, 250, 4, 61, 77, 300, 12], [45, 201, 9]
    want = prefill_then_decode(engine, prompt, continuation)
    gm, calls = through_the_cuda_kernels(engine.runner.graph_module)
    engine.runner = ModelRunner(gm, engine.runner.params, "cpu", engine.kv_cache)
    got = prefill_then_decode(engine, prompt, continuation)
    assert rel_err(got, want) < 1e-4
    assert set(calls) == {"rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding",
                          "store_kv", "attention"}  # fmt: skip
    [out] = engine.generate([prompt, prompt[:4]][:1], max_tokens=4)
    assert (
        out.token_ids
        == [int(t) for t in want[len(prompt) - 1 :].argmax(-1)[:1]] + out.token_ids[1:]
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_cuda_registrations_route_through_the_registry(dtype):
    """registry.dispatch(op, "cuda") is what the CUDA dispatch key runs: Triton for operands it
    takes, the fallback for the rest (an integer tensor here)."""
    from xllm_compile.kernels import registry

    x, w = torch.randn(3, 64, dtype=dtype), torch.rand(64, dtype=dtype)
    close(registry.dispatch("rms_norm", "cuda", x, w, 1e-6), rms_norm_ref(x, w, 1e-6), dtype)
    assert registry.choose("attention", "cuda")[0].name == "triton"
    ints = torch.arange(6).reshape(2, 3)
    assert registry.registry()["silu_and_mul"].for_backend("cuda")[0].supports(ints, ints)
