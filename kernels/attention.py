"""`xllm::attention`: causal attention of a flat ragged batch over per-sequence contiguous KV.

Queries of B sequences are packed as q [T, H, D]; sequence b owns `query_lens[b]` consecutive rows,
whose positions are in `positions`. Its keys and values are the first `seq_lens[b]` rows of its
slot in the cache (already holding this step's keys, written by `xllm::store_kv`). A query at
position p sees keys at positions <= p, and > p - window when a sliding window is set.
GQA: query head h reads KV head h // (H / Hkv).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xllm_compile.kernels.cpu import dispatch_or_fallback


@torch.library.custom_op("xllm::attention", mutates_args=())
def attention(
    q: torch.Tensor,  # [T, H, D]
    kv_cache: torch.Tensor,  # [L, 2, S, M, Hkv, D]
    layer: int,
    positions: torch.Tensor,  # [T]
    seq_slots: torch.Tensor,  # [B]
    query_lens: torch.Tensor,  # [B]
    seq_lens: torch.Tensor,  # [B]
    scale: float,
    sliding_window: int,
) -> torch.Tensor:
    """Reference implementation (also the CPU path)."""
    if q.shape[0] == seq_slots.shape[0]:  # every sequence has one query: a decode step
        return _decode(q, kv_cache[layer], positions, seq_slots, seq_lens, scale, sliding_window)
    return prefill_reference(
        q, kv_cache, layer, positions, seq_slots, query_lens, seq_lens, scale, sliding_window
    )


def prefill_reference(
    q, kv_cache, layer, positions, seq_slots, query_lens, seq_lens, scale, sliding_window
):
    """One SDPA per sequence, over its own KV prefix (host loop: syncs, not graph-capturable)."""
    out = torch.empty_like(q)
    start = 0
    for slot, q_len, kv_len in zip(
        seq_slots.tolist(), query_lens.tolist(), seq_lens.tolist(), strict=True
    ):
        end = start + q_len
        k = kv_cache[layer, 0, slot, :kv_len]  # [Lk, Hkv, D]
        v = kv_cache[layer, 1, slot, :kv_len]
        k_pos = torch.arange(kv_len, device=q.device)
        mask = _mask(positions[start:end, None], k_pos, sliding_window)  # [Lq, Lk]
        out[start:end] = _sdpa(q[start:end], k, v, mask, scale)
        start = end
    return out


def prefill_static(q, cache, positions, seq_slots, query_lens, scale, window):
    """Prefill without host synchronization (capturable in a CUDA graph): every query token
    gathers its own sequence's KV rows up to the static bound `cache.shape[2]` and masks those
    past its position. A token of sequence b at position p sees exactly the rows [0, p] of b's
    slot (already written by store_kv), so this equals prefill_reference. Costs memory
    T x bound x Hkv x D per operand: meant for the graph cache's small prefill buckets, whose
    bound is the kv-length bucket. `cache` is kv_cache[layer]: [2, S, M, Hkv, D]."""
    slots = torch.repeat_interleave(seq_slots, query_lens, output_size=q.shape[0])  # [T]
    return _decode(q, cache, positions, slots, positions + 1, scale, window, bound=cache.shape[2])


def _mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    mask = k_pos <= q_pos
    if window > 0:
        mask = mask & (k_pos > q_pos - window)
    return mask


def _sdpa(q, k, v, mask, scale):
    # q [Lq, H, D], k/v [Lk, Hkv, D] -> [Lq, H, D]; SDPA wants heads first.
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.transpose(0, 1),
        v.transpose(0, 1),
        attn_mask=mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return o.transpose(0, 1)


def _decode_one(q, cache, slot, kv_len, scale, window):
    # One sequence (batch-1 latency): its KV prefix is a slice, so no gather and, without a
    # window cutting it, no mask. Contiguous 4-D operands keep SDPA off its slow math path
    # (measured: 260 -> ~60 us per call for SmolLM2's bf16 shapes, dominated by the op wrapper).
    start = max(0, kv_len - window) if window > 0 else 0  # the query sits at position kv_len-1
    k = cache[0, slot, start:kv_len].transpose(0, 1).unsqueeze(0).contiguous()  # [1, Hkv, L, D]
    v = cache[1, slot, start:kv_len].transpose(0, 1).unsqueeze(0).contiguous()
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )  # q [1, H, 1, D]
    return o.squeeze(2)  # [1, H, D]


def _decode(q, cache, positions, seq_slots, seq_lens, scale, window, bound=None):
    """One query per sequence: gather each sequence's KV up to `bound` rows (default: the
    longest sequence, a host sync; the CUDA binding passes a static bound instead). Rows past a
    sequence's own length re-read its last valid row (then masked), so the op never touches
    cache memory a sequence does not own: with page-mapped KV that memory may be unmapped."""
    if bound is None and q.shape[0] == 1:
        return _decode_one(q, cache, int(seq_slots[0]), int(seq_lens[0]), scale, window)
    bound = int(seq_lens.max()) if bound is None else bound
    k_pos = torch.arange(bound, device=q.device)
    rows = torch.minimum(k_pos[None, :], (seq_lens[:, None] - 1).clamp(min=0))  # [B, Lk]
    k = cache[0][seq_slots[:, None], rows]  # [B, Lk, Hkv, D]
    v = cache[1][seq_slots[:, None], rows]
    mask = (k_pos[None, :] < seq_lens[:, None]) & _mask(positions[:, None], k_pos, window)
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2),  # [B, H, 1, D]
        k.transpose(1, 2),  # [B, Hkv, Lk, D]
        v.transpose(1, 2),
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[2],
    )
    return o.squeeze(2)  # [B, H, D]


@attention.register_kernel("cpu")
def _(q, kv_cache, layer, positions, seq_slots, query_lens, seq_lens, scale, sliding_window):
    # C++ (kernels/cpu) when it builds: no Python between the ATen calls of each step
    args = (q, kv_cache, layer, positions, seq_slots, query_lens, seq_lens, scale, sliding_window)
    return dispatch_or_fallback("attention", attention_reference, *args)


def attention_reference(
    q, kv_cache, layer, positions, seq_slots, query_lens, seq_lens, scale, sliding_window
):
    """The Python reference body (what `xllm::attention` runs without a compiled kernel)."""
    if q.shape[0] == seq_slots.shape[0]:
        return _decode(q, kv_cache[layer], positions, seq_slots, seq_lens, scale, sliding_window)
    return prefill_reference(
        q, kv_cache, layer, positions, seq_slots, query_lens, seq_lens, scale, sliding_window
    )


@attention.register_fake
def _(q, kv_cache, layer, positions, seq_slots, query_lens, seq_lens, scale, sliding_window):
    return torch.empty_like(q)


# `.out`: the memory planner (passes/memory_plan.py) places the result in the activation arena, as
# an ATen op's; a CPU graph then makes the reshape after it once (a view of fixed memory).
torch.library.define(
    "xllm::attention.out",
    "(Tensor q, Tensor kv_cache, SymInt layer, Tensor positions, Tensor seq_slots, "
    "Tensor query_lens, Tensor seq_lens, float scale, SymInt sliding_window, *, "
    "Tensor(a!) out) -> Tensor(a!)",
)


def attention_out_composite(
    q, kv_cache, layer, positions, seq_slots, query_lens, seq_lens, scale, sliding_window, *, out
):
    """Every device: the op, copied into `out` (the CPU kernel writes there directly)."""
    args = (q, kv_cache, layer, positions, seq_slots, query_lens, seq_lens, scale, sliding_window)
    result = torch.ops.xllm.attention.default(*args)
    if out.shape != result.shape:
        out.resize_(result.shape)
    return out.copy_(result)


torch.library.impl("xllm::attention.out", "CompositeExplicitAutograd", attention_out_composite)


@torch.library.register_fake("xllm::attention.out")
def _(q, kv_cache, layer, positions, seq_slots, query_lens, seq_lens, scale, window, *, out):
    return out
