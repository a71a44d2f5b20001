"""xllm::attention and xllm::store_kv against a naive per-token reference, and opcheck."""

from __future__ import annotations

import pytest
import torch

import xllm_compile.kernels  # noqa: F401


def naive_attention(q, kv_cache, layer, positions, seq_slots, query_lens, seq_lens, scale, window):
    """Token by token, head by head: the definition, with no masking tricks."""
    out = torch.empty_like(q)
    group = q.shape[1] // kv_cache.shape[4]
    token = 0
    for slot, q_len in zip(seq_slots.tolist(), query_lens.tolist(), strict=True):
        for _ in range(q_len):
            pos = int(positions[token])
            lo = max(0, pos - window + 1) if window else 0
            for h in range(q.shape[1]):
                k = kv_cache[layer, 0, slot, lo : pos + 1, h // group]  # [n, D]
                v = kv_cache[layer, 1, slot, lo : pos + 1, h // group]
                weights = torch.softmax((k @ q[token, h]) * scale, dim=0)
                out[token, h] = weights @ v
            token += 1
    return out


def make_batch(query_lens, ctx_before, num_heads=4, num_kv_heads=2, head_dim=8, window=0):
    torch.manual_seed(0)
    num_layers, num_slots, max_len = 2, 5, 32
    kv_cache = torch.randn(num_layers, 2, num_slots, max_len, num_kv_heads, head_dim)
    seq_slots = torch.tensor([3, 0, 4][: len(query_lens)])
    positions = torch.cat(
        [torch.arange(c, c + n) for c, n in zip(ctx_before, query_lens, strict=True)]
    )
    seq_lens = torch.tensor([c + n for c, n in zip(ctx_before, query_lens, strict=True)])
    q = torch.randn(int(sum(query_lens)), num_heads, head_dim)
    return q, kv_cache, 1, positions, seq_slots, torch.tensor(query_lens), seq_lens, 0.3, window


@pytest.mark.parametrize(
    "query_lens,ctx_before,window",
    [
        ([5, 1, 7], [0, 0, 0], 0),  # prefill of 3 prompts (one of length 1)
        ([1, 1, 1], [4, 9, 20], 0),  # decode step (batched path)
        ([1], [0], 0),  # T = 1
        ([3, 1], [6, 11], 0),  # chunked prefill next to a decode
        ([9, 1], [0, 15], 4),  # sliding window, prefill and decode
    ],
)
def test_attention_matches_naive(query_lens, ctx_before, window):
    args = make_batch(query_lens, ctx_before, window=window)
    from xllm_compile.kernels.attention import attention_reference
    from xllm_compile.kernels.cpu import ensure_loaded

    expected = naive_attention(*args)
    # the registered CPU kernel (C++ when it builds) and the Python reference body
    torch.testing.assert_close(torch.ops.xllm.attention(*args), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attention_reference(*args), expected, rtol=1e-5, atol=1e-5)
    assert ensure_loaded() is None  # this machine builds the C++ kernels (CI does too)


@pytest.mark.parametrize(
    "query_lens,ctx_before,window",
    [([5, 1, 7], [0, 0, 0], 0), ([1, 1, 1], [4, 9, 20], 0), ([3, 1], [6, 11], 0), ([1], [9], 4)],
)
def test_attention_out_writes_the_ops_result_into_out(query_lens, ctx_before, window):
    """`.out` (what the arena program calls): the op's result, bit for bit, in the given memory,
    from the C++ kernel and from the composite every other device runs; a wrongly sized out is
    resized, as ATen's out= ops do."""
    from xllm_compile.kernels.attention import attention_out_composite

    args = make_batch(query_lens, ctx_before, window=window)
    expected = torch.ops.xllm.attention(*args)
    for fn in (torch.ops.xllm.attention.out, attention_out_composite):
        out = torch.full_like(args[0], float("nan"))
        got = fn(*args, out=out)
        assert got.data_ptr() == out.data_ptr() and torch.equal(out, expected)
    small = torch.empty(0)
    assert torch.equal(torch.ops.xllm.attention.out(*args, out=small), expected)
    with pytest.raises(RuntimeError, match="out is"):
        torch.ops.xllm.attention.out(*args, out=torch.empty(args[0].shape, dtype=torch.float64))


def test_store_kv_writes_in_place_at_slot_and_position():
    cache = torch.zeros(2, 2, 4, 8, 2, 3)
    ptr = cache.data_ptr()
    k, v = torch.randn(3, 2, 3), torch.randn(3, 2, 3)
    torch.ops.xllm.store_kv(cache, 1, k, v, torch.tensor([2, 2, 0]), torch.tensor([5, 6, 0]))
    assert cache.data_ptr() == ptr
    torch.testing.assert_close(cache[1, 0, 2, 5:7], k[:2])
    torch.testing.assert_close(cache[1, 1, 0, 0], v[2])
    assert int((cache != 0).sum()) == 3 * 2 * 3 * 2  # nothing else touched


def test_opcheck():
    args = make_batch([3, 1], [2, 5])
    torch.library.opcheck(torch.ops.xllm.attention.default, args)
    out = {"out": torch.empty_like(args[0])}  # an out= op: no functionalization (aot_dispatch)
    torch.library.opcheck(
        torch.ops.xllm.attention.out, args, out, test_utils=("test_schema", "test_faketensor")
    )
    cache = torch.zeros(2, 2, 4, 8, 2, 3)
    store_args = (
        cache,
        0,
        torch.randn(2, 2, 3),
        torch.randn(2, 2, 3),
        torch.tensor([1, 1]),
        torch.tensor([0, 1]),
    )
    torch.library.opcheck(torch.ops.xllm.store_kv.default, store_args)


@pytest.mark.parametrize("window", [0, 4])
def test_cuda_static_decode_path_matches_naive_on_cpu(window):
    """The sync-free decode path bound to CUDA (graph-capturable), run on the CPU."""
    from xllm_compile.kernels.cuda.attention import _decode_static

    q, cache, layer, positions, slots, q_lens, seq_lens, scale, _ = make_batch(
        [1, 1, 1], [4, 9, 20]
    )
    out = _decode_static(q, cache[layer], positions, slots, seq_lens, scale, window)
    expected = naive_attention(q, cache, layer, positions, slots, q_lens, seq_lens, scale, window)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "query_lens,ctx_before,window",
    [([5, 1, 7], [0, 0, 0], 0), ([3, 1], [6, 11], 0), ([9, 1], [0, 15], 4)],
)
def test_static_prefill_path_matches_naive_on_cpu(query_lens, ctx_before, window):
    """The sync-free prefill bound to CUDA graph capture, run on the CPU: bounded by the cache
    view's extent (the graph cache's kv bucket), never reading past a token's own position."""
    from xllm_compile.kernels.attention import prefill_static

    q, cache, layer, positions, slots, q_lens, seq_lens, scale, _ = make_batch(
        query_lens, ctx_before, window=window
    )
    bound = int(seq_lens.max()) + 3  # a bucket a little longer than the longest sequence
    out = prefill_static(q, cache[layer][:, :, :bound], positions, slots, q_lens, scale, window)
    expected = naive_attention(q, cache, layer, positions, slots, q_lens, seq_lens, scale, window)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_padding_sequence_of_many_tokens_at_position_zero():
    """The graph cache pads a prefill with a dummy sequence whose tokens all sit at position 0 of
    a scratch slot (query_len > seq_len = 1): every kernel treats it as attending to row 0."""
    from xllm_compile.kernels.attention import attention_reference, prefill_static

    q, cache, layer, positions, slots, q_lens, seq_lens, scale, window = make_batch([4], [0])
    q = torch.cat([q, torch.randn(3, *q.shape[1:])])
    positions = torch.cat([positions, torch.zeros(3, dtype=torch.long)])
    slots, q_lens, seq_lens = torch.tensor([3, 1]), torch.tensor([4, 3]), torch.tensor([4, 1])
    args = (q, cache, layer, positions, slots, q_lens, seq_lens, scale, window)
    v0 = cache[layer, 1, 1, 0]  # [Hkv, D]: one key, so attention returns its value
    expected_pad = v0.repeat_interleave(q.shape[1] // v0.shape[0], dim=0).expand(3, -1, -1)
    real = naive_attention(
        q[:4], cache, layer, positions[:4], slots[:1], q_lens[:1], seq_lens[:1], scale, 0
    )
    for out in (
        torch.ops.xllm.attention(*args),
        attention_reference(*args),
        prefill_static(q, cache[layer][:, :, :8], positions, slots, q_lens, scale, window),
    ):
        torch.testing.assert_close(out[:4], real, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[4:], expected_pad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "query_lens,ctx_before,window,builds_mask",
    [([5, 7], [0, 0], 0, False), ([3, 1], [6, 11], 0, True), ([9], [0], 4, True)],
)
def test_whole_prompts_take_sdpas_causal_mask(query_lens, ctx_before, window, builds_mask):
    """A prompt with no cached prefix and no window is SDPA's own causal case: the C++ kernel
    passes is_causal instead of building the position mask (flash attention then skips the masked
    blocks); a cached prefix or a window still gets the mask. Both match the naive definition."""
    from xllm_compile.kernels.cpu import ensure_loaded

    if ensure_loaded() is not None:
        pytest.skip("no C++ kernels on this machine")
    args = make_batch(query_lens, ctx_before, window=window)
    with torch.profiler.profile() as prof:
        out = torch.ops.xllm.attention(*args)
    names = {e.name for e in prof.events()}
    assert ("aten::arange" in names) == builds_mask, names
    torch.testing.assert_close(out, naive_attention(*args), rtol=1e-5, atol=1e-5)
