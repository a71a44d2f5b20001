"""Attention over the page pool's per-sequence contiguous KV in Triton (kernels/attention.py's
semantics): one program per (query token, head) streams its sequence's K and V rows of its KV
head (GQA) in blocks with an online softmax in fp32, from the window's first row to its own
position: causal, ragged, sliding window. A decode step has one query per sequence; a prefill
step gives each query token its sequence's slot (repeat_interleave with a static output size)
and sees rows [0, position]. No host synchronization: the loop bounds are read on the device,
so both paths can be captured in a CUDA graph.

One program per query row re-reads K/V for every query of a prefill (no tiling over queries):
right for decode and for the graph cache's small prefill buckets; a tiled prefill kernel
(FlashAttention-style, a block of queries a program) is the next step for long prompts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _attention_kernel(
    q_ptr, cache_ptr, out_ptr, slots_ptr, pos_ptr, lens_ptr,
    q_t, q_h, o_t, o_h, layer_off, kv_stride, s_stride, m_stride, h_stride,
    n_heads, group, scale, window,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0) // n_heads
    head = tl.program_id(0) % n_heads
    kv_head = head // group
    slot = tl.load(slots_ptr + t).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    end = tl.minimum(tl.load(lens_ptr + t).to(tl.int64), pos + 1)  # rows [start, end)
    start = tl.where(window > 0, tl.maximum(pos - window + 1, 0), 0)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(q_ptr + t * q_t + head * q_h + d, mask=dmask, other=0.0).to(tl.float32)
    base = cache_ptr + layer_off + slot * s_stride + kv_head * h_stride
    m_i = tl.full((), float("-inf"), tl.float32)
    l_i = tl.full((), 0.0, tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for n in range(start, end, BLOCK_N):
        rows = n + tl.arange(0, BLOCK_N)
        rmask = rows < end
        offs = rows[:, None] * m_stride + d[None, :]
        mask = rmask[:, None] & dmask[None, :]
        k = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1) * scale
        s = tl.where(rmask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m_i - m_new)
        v = tl.load(base + kv_stride + offs, mask=mask, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    out = acc / l_i
    tl.store(out_ptr + t * o_t + head * o_h + d, out.to(out_ptr.dtype.element_ty), mask=dmask)


def _launch(q, kv_cache, layer, token_slots, positions, kv_lens, scale, window):
    n_tokens, n_heads, d = q.shape
    n_kv = kv_cache.shape[4]
    if kv_cache.stride(-1) != 1:
        raise ValueError("the KV cache's head dim must be contiguous")
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty_like(q)
    st = kv_cache.stride()
    if n_tokens:
        _attention_kernel[(n_tokens * n_heads,)](
            q, kv_cache, out, token_slots, positions, kv_lens, q.stride(0), q.stride(1),
            out.stride(0), out.stride(1), layer * st[0], st[1], st[2], st[3], st[4],
            n_heads, n_heads // n_kv, scale, window,
            D=d, BLOCK_N=32, BLOCK_D=triton.next_power_of_2(d),
        )  # fmt: skip
    return out


def attention(q, kv_cache, layer, positions, seq_slots, query_lens, seq_lens, scale, window):
    """xllm::attention's contract (kernels/attention.py), decode and ragged prefill alike."""
    if q.shape[0] == seq_slots.shape[0]:  # one query per sequence: a decode step
        return _launch(q, kv_cache, layer, seq_slots, positions, seq_lens, scale, window)
    slots = torch.repeat_interleave(seq_slots, query_lens, output_size=q.shape[0])
    return _launch(q, kv_cache, layer, slots, positions, positions + 1, scale, window)
