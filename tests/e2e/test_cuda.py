"""The same artifacts on a CUDA device (skipped without one): transformers parity in fp32 and
bf16, and greedy decoding through CUDA graphs equal to eager; the xllm:: ops run the registry's
CUDA choice (the Triton kernels where triton imports), and the Triton kernels on CUDA tensors
equal the references."""

from __future__ import annotations

import copy

import pytest
import torch

from xllm_compile.runtime import load
from xllm_compile.runtime.model_runner import attach_graph_cache

from conftest import compile_cli
from helpers import hf_greedy, hf_logits, prefill_then_decode, rel_err

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]
PROMPT = [1, 17, 93, 250, 4, 61, 77, 300, 12, 45, 201, 9]


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3", "mistral"])
def test_cuda_fp32_parity_and_cuda_graph_greedy(family, family_models, tmp_path):
    model, model_dir, _ = family_models(family)
    art = compile_cli(model_dir, tmp_path / "cuda", "--device", "cuda")
    model = copy.deepcopy(model).to("cuda")
    continuation = hf_greedy(model, PROMPT, 20)
    ref = hf_logits(model, PROMPT + continuation).cpu()
    engine = load(art)
    out = prefill_then_decode(engine, PROMPT, continuation).cpu()
    assert rel_err(out, ref) < 1e-4
    eager = engine.generate([PROMPT, PROMPT[:5]], max_tokens=32, ignore_eos=True)
    cache = attach_graph_cache(engine, warmup=True)
    graphed = engine.generate([PROMPT, PROMPT[:5]], max_tokens=32, ignore_eos=True)
    assert [r.token_ids for r in graphed] == [r.token_ids for r in eager]
    assert graphed[0].token_ids == hf_greedy(model, PROMPT, 32)
    assert all(e.graph is not None for e in cache.entries.values())


def test_cuda_bf16_logits(family_models, tmp_path):
    model, model_dir, _ = family_models("qwen2")
    art = compile_cli(model_dir, tmp_path / "bf16", "--device", "cuda", "--dtype", "bfloat16")
    ref = hf_logits(copy.deepcopy(model).to("cuda", torch.bfloat16), PROMPT).cpu()
    out = prefill_then_decode(load(art), PROMPT, []).cpu()
    assert rel_err(out, ref) < 2e-2


def test_cuda_graphs_over_the_arena(family_models, tmp_path):
    """load(graph_cache=True) on CUDA captures each bucket over the artifact's arena plans: the
    static inputs and logits live in the CUDA VMM arena, and greedy tokens equal eager's."""
    _, model_dir, _ = family_models("qwen2")
    art = compile_cli(model_dir, tmp_path / "arena", "--device", "cuda", "--max-num-seqs", "8")
    prompts = [PROMPT, PROMPT[:5], PROMPT[3:]]
    eager = load(art).generate(prompts, max_tokens=24, ignore_eos=True)
    engine = load(art, graph_cache=True, max_num_seqs=8)
    cache = engine.runner
    assert cache.use_cuda_graphs and cache.use_arena
    graphed = engine.generate(prompts, max_tokens=24, ignore_eos=True)
    assert [r.token_ids for r in graphed] == [r.token_ids for r in eager]
    assert cache.stats.arena_programs == cache.stats.builds >= 2  # a prefill and a decode bucket
    base, size = cache.arena.vrange.address, cache.arena.nbytes
    for entry in cache.entries.values():
        assert entry.graph is not None
        for t in (entry.buffer, entry.output):
            assert base <= t.data_ptr() and t.data_ptr() + t.nbytes <= base + size


def test_triton_kernels_on_cuda_equal_the_references():
    """What tests/kernels/test_triton.py checks under the interpreter, compiled for the GPU."""
    from xllm_compile.kernels import registry
    from xllm_compile.kernels.attention import attention_reference

    assert registry.choose("attention", "cuda")[0].name == "triton"
    torch.manual_seed(0)
    cache = torch.randn(2, 2, 3, 64, 2, 16, device="cuda")
    lens = torch.tensor([5, 64, 33], device="cuda")
    q = torch.randn(3, 6, 16, device="cuda")
    args = (q, cache, 1, lens - 1, torch.tensor([2, 0, 1], device="cuda"),
            torch.ones(3, dtype=torch.int64, device="cuda"), lens)  # fmt: skip
    for window in (0, 7):
        got = torch.ops.xllm.attention(*args, 0.25, window)  # the CUDA key: the Triton kernel
        assert rel_err(got, attention_reference(*args, 0.25, window)) < 1e-5
