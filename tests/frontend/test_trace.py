"""The traced program: symbolic sizes, no functionalized KV write (DESIGN.md trap), runs on CPU."""

from __future__ import annotations

import torch

from xllm_compile import program_format
from xllm_compile.artifact import PROGRAM
from xllm_compile.runtime import load


def test_saved_program_writes_kv_in_place(llama_artifact):
    """Regression guard for the functionalization trap: `run_decompositions` turns the in-place
    store into auto_functionalized, which clones the whole cache every step."""
    ep = program_format.loads((llama_artifact / PROGRAM).read_bytes())
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert not any("auto_functionalized" in t for t in targets)
    assert targets.count("xllm.store_kv.default") == 2  # one per layer
    assert targets.count("xllm.attention.default") == 2
    # contiguous: the paged cache's unmapped pages cannot be read (cloned) as a whole
    engine = load(llama_artifact, kv_cache="contiguous")
    cache = engine.kv_cache.tensor
    ptr, before = cache.data_ptr(), cache.clone()
    engine.generate([[1, 2, 3]], max_tokens=2)
    assert engine.kv_cache.tensor.data_ptr() == ptr
    assert not torch.equal(cache, before)  # the program wrote into the runtime's tensor


def test_token_and_batch_dims_are_symbolic(llama_artifact):
    ep = program_format.loads((llama_artifact / PROGRAM).read_bytes())
    placeholders = {n.name: n.meta["val"] for n in ep.graph.nodes if n.op == "placeholder"}
    assert isinstance(placeholders["input_ids"].shape[0], torch.SymInt)
    assert isinstance(placeholders["seq_slots"].shape[0], torch.SymInt)
    assert isinstance(placeholders["kv_cache"].shape[2], torch.SymInt)
    assert "meta" not in ep.graph_module.code  # no device pinned by tracing
