"""`xllm::attention` on CUDA as a composition of torch ops: the decode path without host
synchronization, so that a decode step can be captured in a CUDA graph. The registry
(kernels/registry.py) runs the Triton kernel first and this where triton is missing.

The CPU reference sizes its gather by `int(seq_lens.max())`, a device->host sync that CUDA-graph
capture forbids. Here the bound is the cache's position extent `kv_cache.shape[3]`, a static
shape: the graph cache passes a view of the cache cut to the step's kv-length bucket, so the
bound tracks the longest sequence to within the bucket. Prefill takes the same sync-free path
(`prefill_static`) while a CUDA graph is being captured (the graph cache's prefill buckets), and
the reference path (one SDPA per sequence) otherwise, where its memory is not bounded by a bucket.
"""

from __future__ import annotations

import torch

from xllm_compile.kernels.attention import _decode, prefill_reference, prefill_static


def _decode_static(q, cache, positions, seq_slots, seq_lens, scale, window):
    # cache here is kv_cache[layer]: [2, S, M, Hkv, D]; M is the static bound
    return _decode(q, cache, positions, seq_slots, seq_lens, scale, window, bound=cache.shape[2])


def attention_composite(
    q, kv_cache, layer, positions, seq_slots, query_lens, seq_lens, scale, sliding_window
):
    """The sync-free composition of torch ops (the fallback under the Triton kernel)."""
    if q.shape[0] == seq_slots.shape[0]:
        return _decode_static(
            q, kv_cache[layer], positions, seq_slots, seq_lens, scale, sliding_window
        )
    if torch.cuda.is_current_stream_capturing():
        return prefill_static(
            q, kv_cache[layer], positions, seq_slots, query_lens, scale, sliding_window
        )
    return prefill_reference(
        q, kv_cache, layer, positions, seq_slots, query_lens, seq_lens, scale, sliding_window
    )
