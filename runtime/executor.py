"""Runs the artifact's program: binds its weights once, then turns a batch of sequences into the
program's flat ragged inputs and returns logits for the last token of each sequence."""

from __future__ import annotations

import torch

from xllm_compile.runtime.sequence import Sequence


class Executor:
    def __init__(self, graph_module: torch.fx.GraphModule, params: list[torch.Tensor], device):
        self.graph_module = graph_module
        self.params = params
        self.device = torch.device(device)

    def step_inputs(self, seqs: list[Sequence], all_logits: bool = False) -> list[torch.Tensor]:
        """Flat ragged inputs for one step, in the order of trace.INPUT_NAMES (minus kv_cache)."""
        ids, positions, token_slots, query_lens, seq_lens = [], [], [], [], []
        for seq in seqs:
            pending = seq.pending_ids()
            ids += pending
            positions += range(seq.num_cached, seq.num_cached + len(pending))
            token_slots += [seq.slot] * len(pending)
            query_lens.append(len(pending))
            seq_lens.append(seq.num_cached + len(pending))
        if all_logits:
            logits_indices = list(range(len(ids)))
        else:
            logits_indices = torch.tensor(query_lens).cumsum(0).sub(1).tolist()
        rows = (
            ids,
            positions,
            token_slots,
            [s.slot for s in seqs],
            query_lens,
            seq_lens,
            logits_indices,
        )
        return [torch.tensor(r, dtype=torch.int64, device=self.device) for r in rows]

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], kv_cache: torch.Tensor, all_logits: bool = False):
        """Run one step and mark the pending tokens as cached. Returns logits [N, V]."""
        inputs = self.step_inputs(seqs, all_logits)
        (logits,) = self.graph_module(*self.params, *inputs, kv_cache)
        for seq in seqs:
            seq.num_cached = seq.num_tokens
        return logits
