"""Tracing: `torch.export` of the model over a flat ragged batch with symbolic sizes.

The model is built on the meta device, so tracing needs no weight memory; the exported program
keeps its parameters as meta placeholders and the weights travel separately (safetensors).
The program is never passed through `run_decompositions`: that would functionalize the in-place
`xllm::store_kv` and clone the whole KV cache on every step (DESIGN.md, "Traps").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.export import Dim, ExportedProgram

from xllm_compile.config import ModelConfig
from xllm_compile.models import CausalLM

# Order of the program's user inputs; the runtime feeds them positionally in this order.
INPUT_NAMES = (
    "input_ids",
    "positions",
    "token_slots",
    "seq_slots",
    "query_lens",
    "seq_lens",
    "logits_indices",
    "kv_cache",
)


def build_meta_model(config: ModelConfig, dtype: torch.dtype, max_len: int) -> CausalLM:
    with torch.device("meta"):
        model = CausalLM(config, max_len).to(dtype)
    model.model.rotary_emb.float()  # cos/sin tables stay fp32 whatever the model dtype
    return model.eval()


# Sample sizes for tracing: distinct and > 1, so export neither specializes them nor unifies
# their dims. Each dim's range must hold its sample, whatever the limits asked for.
NUM_TOKENS, NUM_SEQS, NUM_LOGITS, NUM_SLOTS, KV_LEN = 9, 3, 5, 4, 16


def sample_inputs(config: ModelConfig, dtype: torch.dtype, device: str = "meta") -> tuple:
    ids = torch.zeros(NUM_TOKENS, dtype=torch.int64, device=device)
    seqs = torch.zeros(NUM_SEQS, dtype=torch.int64, device=device)
    cache_shape = (config.num_layers, 2, NUM_SLOTS, KV_LEN, config.num_kv_heads, config.head_dim)
    return (
        ids,
        ids.clone(),
        ids.clone(),
        seqs,
        seqs.clone(),
        seqs.clone(),
        torch.zeros(NUM_LOGITS, dtype=torch.int64, device=device),
        torch.zeros(cache_shape, dtype=dtype, device=device),
    )


def verify_inputs(config: ModelConfig, dtype: torch.dtype, seed: int = 0) -> tuple:
    """Real inputs for the pass manager's numeric check: a ragged prefill of two sequences
    (3 and 2 tokens) into a zeroed cache, logits for every token; order of INPUT_NAMES."""
    g = torch.Generator().manual_seed(seed)
    query_lens = torch.tensor([3, 2])
    slots = torch.tensor([1, 0])  # not the identity, so a slot mix-up shows
    cache_len = 8
    return (
        torch.randint(0, config.vocab_size, (5,), generator=g),
        torch.tensor([0, 1, 2, 0, 1]),  # positions
        slots.repeat_interleave(query_lens),  # token_slots
        slots,
        query_lens,
        query_lens.clone(),  # seq_lens: a fresh prefill
        torch.arange(5),  # logits_indices
        torch.zeros(
            (config.num_layers, 2, 2, cache_len, config.num_kv_heads, config.head_dim), dtype=dtype
        ),
    )


def dynamic_shapes(max_num_tokens: int, max_num_seqs: int, max_len: int) -> tuple:
    tokens = Dim("num_tokens", min=1, max=max(max_num_tokens, NUM_TOKENS))
    seqs = Dim("num_seqs", min=1, max=max(max_num_seqs, NUM_SEQS))
    logits = Dim("num_logits", min=1, max=max(max_num_tokens, NUM_TOKENS))
    slots = Dim("num_kv_slots", min=1, max=1 << 20)
    kv_len = Dim("kv_len", min=2, max=max(max_len, KV_LEN))
    per_token, per_seq = {0: tokens}, {0: seqs}
    return (
        per_token,
        per_token,
        per_token,
        per_seq,
        per_seq,
        per_seq,
        {0: logits},
        {2: slots, 3: kv_len},
    )


def export_model(
    config: ModelConfig,
    dtype: torch.dtype,
    max_len: int,
    max_num_tokens: int,
    max_num_seqs: int,
    transform: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
) -> ExportedProgram:
    """Export the family's CausalLM; returns a program whose parameters are meta tensors.
    `transform` changes the built model first, from outside (tp.apply_tp)."""
    model = build_meta_model(config, dtype, max_len)
    if transform is not None:
        model = transform(model)
    with torch.no_grad():
        ep = torch.export.export(
            model,
            sample_inputs(config, dtype),
            dynamic_shapes=dynamic_shapes(max_num_tokens, max_num_seqs, max_len),
        )
    strip_metadata_asserts(ep)
    return ep


def strip_metadata_asserts(ep: ExportedProgram) -> int:
    """Remove the `_assert_tensor_metadata` checks export adds around `.to()`: they pin the
    device seen while tracing (meta), and the program must run on whatever device loads it."""
    graph = ep.graph_module.graph
    asserts = [n for n in graph.nodes if n.target == torch.ops.aten._assert_tensor_metadata.default]
    for node in asserts:
        graph.erase_node(node)
    ep.graph_module.recompile()
    return len(asserts)
