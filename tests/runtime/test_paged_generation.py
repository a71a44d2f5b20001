"""Generation through the page-mapped KV cache: the CPU default, equal to transformers token for
token in both layouts, and a pool too small for the load still finishes every request with the
tokens each gets alone (out of pages = preempt and recompute, never a crash or a wrong token)."""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from xllm_compile.runtime import load
from xllm_compile.runtime.kv_cache import ContiguousKVCache
from xllm_compile.runtime.model_runner import attach_graph_cache
from xllm_compile.runtime.page_pool import make_page_pool
from xllm_compile.runtime.paged_kv_cache import PagedKVCache
from xllm_compile.runtime.prefix_cache import PrefixCache

from conftest import compile_cli
from helpers import hf_greedy, hf_logits, prefill_then_decode, rel_err

PROMPT = [1, 17, 93, 250, 4, 61, 77, 300, 12, 45, 201, 9]
HAS_CUDA_VMM = torch.cuda.is_available() and importlib.util.find_spec("cuda") is not None
PAGE = 4096  # the test models keep 512 B of K/V per token: 8 tokens a page


def use_cache(engine, cache) -> None:
    engine.kv_cache = engine.scheduler.kv_cache = cache
    engine.prefix_cache = engine.scheduler.prefix_cache = PrefixCache(cache)


def layer_major_cache(engine, num_pages: int) -> PagedKVCache:
    g = engine.kv_cache.geometry
    return PagedKVCache(make_page_pool("cpu", PAGE, num_pages), g, layout="layer_major")


def test_cpu_default_is_the_paged_cache(llama_artifact):
    engine = load(llama_artifact)
    assert isinstance(engine.kv_cache, PagedKVCache)
    assert engine.kv_cache.layout == "token_major"
    assert isinstance(load(llama_artifact, kv_cache="contiguous").kv_cache, ContiguousKVCache)


@pytest.mark.parametrize("family", ["llama3", "qwen3", "mistral"])
def test_small_pages_match_transformers(family, family_models):
    model, _, art = family_models(family)
    engine = load(art, kv_page_size=PAGE)
    continuation = hf_greedy(model, PROMPT, 20)  # 32 tokens: 4 pages, three page crossings
    ref = hf_logits(model, PROMPT + continuation)
    assert rel_err(prefill_then_decode(engine, PROMPT, continuation), ref) < 1e-4
    [out] = engine.generate([PROMPT], max_tokens=20, ignore_eos=True)
    assert out.token_ids == continuation
    stats = engine.kv_cache.pool.stats()
    assert stats.pages_mapped == stats.retained > 0  # everything went back, or to the store
    engine.prefix_cache.clear()
    assert engine.kv_cache.pool.stats().pages_mapped == 0


def test_layer_major_layout_matches_transformers(family_models):
    model, _, art = family_models("qwen3")
    engine = load(art)
    use_cache(engine, layer_major_cache(engine, 512))
    prompts = [PROMPT, PROMPT[:5]]
    out = engine.generate(prompts, max_tokens=16, ignore_eos=True)
    assert [o.token_ids for o in out] == [hf_greedy(model, p, 16) for p in prompts]


def long_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 320) for _ in range(rng.randint(30, 60))] for _ in range(n)]


def test_exhausted_pool_finishes_every_request_as_if_alone(llama_artifact):
    prompts = long_prompts(8)  # up to 61 + 24 tokens each: 11 pages; the pool has 40
    roomy = load(llama_artifact, kv_cache="contiguous")
    alone = [roomy.generate([p], max_tokens=24, ignore_eos=True)[0].token_ids for p in prompts]
    engine = load(llama_artifact, kv_memory=40 * PAGE, kv_page_size=PAGE)
    assert engine.kv_cache.pool.num_pages == 40
    together = engine.generate(prompts, max_tokens=24, ignore_eos=True)
    assert [c.token_ids for c in together] == alone
    assert engine.scheduler.num_preemptions > 0  # the pool really ran out
    stats = engine.kv_cache.pool.stats()
    assert stats.pages_free + stats.retained == 40  # back, or held by the prefix store


def test_sampled_request_survives_preemption(llama_artifact):
    """Seeded sampling keeps its generator across preemption (layer-major pages this time)."""
    prompts = long_prompts(6, seed=1)
    sampling = dict(max_tokens=40, ignore_eos=True, temperature=0.8, seed=7)
    roomy = load(llama_artifact, kv_cache="contiguous")
    alone = [roomy.generate([p], **sampling)[0].token_ids for p in prompts]
    engine = load(llama_artifact)
    use_cache(engine, layer_major_cache(engine, 36))  # 4 regions of 32 tokens a page
    together = engine.generate(prompts, **sampling)
    assert [c.token_ids for c in together] == alone
    assert engine.scheduler.num_preemptions > 0


@pytest.mark.skipif(not HAS_CUDA_VMM, reason="no CUDA device or cuda-python")
def test_cuda_paged_cache_matches_transformers_with_and_without_graphs(family_models, tmp_path):
    model, model_dir, _ = family_models("llama3")
    art = compile_cli(model_dir, tmp_path / "cuda", "--device", "cuda")
    engine = load(art, kv_cache="paged", kv_memory=64 << 20)
    assert isinstance(engine.kv_cache, PagedKVCache) and engine.kv_cache.tensor.is_cuda
    expected = hf_greedy(model, PROMPT, 24)
    prompts = [PROMPT, PROMPT[:5], PROMPT[:9]]
    eager = engine.generate(prompts, max_tokens=24, ignore_eos=True)
    assert eager[0].token_ids == expected
    attach_graph_cache(engine, warmup=True)  # CUDA graphs over page-mapped KV memory
    graphs = engine.generate(prompts, max_tokens=24, ignore_eos=True)
    assert [c.token_ids for c in graphs] == [c.token_ids for c in eager]
