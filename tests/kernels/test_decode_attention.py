"""The CPU decode-attention fast path (kernels/cpu/xllm_decode_attention.cpp) and the raw row
store of xllm::store_kv, on the cache layouts the runtime uses (contiguous, and token-major as
the paged cache lays it out: one region per sequence holding every layer's K and V per token),
head_dim 16, 32, 64 and 128, GQA groups of 1, 2, 3, 7 and 16, lengths around the 16-row
blocks, sliding windows, fp32 and bf16, against the naive per-token definition."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_attention_ops import naive_attention

from xllm_compile.kernels.cpu import ensure_loaded

LAYERS, SLOTS, MAX_LEN = 2, 4, 80


def make_cache(kv_heads, head_dim, dtype, token_major, seed=0, max_len=MAX_LEN):
    """[L, 2, S, M, Hkv, D] with random contents; token-major: S outermost in memory, then
    positions, then layers and K/V (the paged layout's strides)."""
    g = torch.Generator().manual_seed(seed)
    shape = (SLOTS, max_len, LAYERS, 2, kv_heads, head_dim) if token_major else None
    if token_major:
        return torch.randn(shape, generator=g).to(dtype).permute(2, 3, 0, 1, 4, 5)
    return torch.randn(LAYERS, 2, SLOTS, max_len, kv_heads, head_dim, generator=g).to(dtype)


@pytest.mark.parametrize("token_major", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim", [(4, 4, 64), (9, 3, 64), (14, 2, 128), (4, 2, 16), (16, 1, 32)]
)
@pytest.mark.parametrize("window", [0, 20])
def test_decode_fast_path_matches_naive(token_major, dtype, heads, kv_heads, head_dim, window):
    assert ensure_loaded() is None
    cache = make_cache(kv_heads, head_dim, dtype, token_major)
    assert not cache.is_contiguous() if token_major else cache.is_contiguous()
    slots = torch.tensor([2, 0, 3, 1])
    seq_lens = torch.tensor([1, 17, 80, 33])
    q = torch.randn(4, heads, head_dim).to(dtype)
    positions, q_lens = seq_lens - 1, torch.ones(4, dtype=torch.long)
    args = (q, cache, 1, positions, slots, q_lens, seq_lens, head_dim**-0.5, window)
    with torch.profiler.profile() as prof:
        out = torch.ops.xllm.attention(*args)
    if torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX2"):  # else the general path
        ran = {e.name for e in prof.events()}
        assert not any("scaled_dot_product" in name for name in ran)  # the fast path, not SDPA
    expected = naive_attention(q.float(), cache.float(), *args[2:])
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: one rounding of an fp32 result
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)


def test_lengths_around_the_blocks():
    cache = make_cache(2, 64, torch.float32, True, seed=1)
    for n in (1, 2, 15, 16, 17, 31, 32, 47, 79, 80):
        q = torch.randn(1, 6, 64)
        args = (q, cache, 0, torch.tensor([n - 1]), torch.tensor([3]), torch.tensor([1]))
        args += (torch.tensor([n]), 0.125, 0)
        expected = naive_attention(q, cache, *args[2:])
        torch.testing.assert_close(torch.ops.xllm.attention(*args), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (14, 2, 128), (4, 4, 16)])
@pytest.mark.parametrize("window", [0, 100])
def test_long_ragged_batch_rows_are_each_sequences_alone(dtype, heads, kv_heads, head_dim, window):
    """Sequences of 64 to 300 rows in one batch (past the 80 rows above, windows cut some): the
    naive definition's numbers, and each sequence's output bit for bit what it gets alone (a
    row never depends on the batch it shares: bucket padding must not move logits)."""
    cache = make_cache(kv_heads, head_dim, dtype, True, seed=2, max_len=300)
    slots = torch.tensor([3, 1, 0, 2])
    seq_lens = torch.tensor([65, 300, 129, 64])
    q = torch.randn(4, heads, head_dim).to(dtype)
    args = (q, cache, 1, seq_lens - 1, slots, torch.ones(4, dtype=torch.long), seq_lens)
    args += (head_dim**-0.5, window)
    out = torch.ops.xllm.attention(*args)
    expected = naive_attention(q.float(), cache.float(), *args[2:])
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)
    for i in range(4):  # each sequence alone: bit for bit its row of the batch
        one = (q[i : i + 1], cache, 1, seq_lens[i : i + 1] - 1, slots[i : i + 1])
        one += (torch.ones(1, dtype=torch.long), seq_lens[i : i + 1], head_dim**-0.5, window)
        assert torch.equal(torch.ops.xllm.attention(*one), out[i : i + 1])


@pytest.mark.parametrize("token_major", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_rows_land_in_place(token_major, dtype):
    cache = make_cache(3, 64, dtype, token_major)
    before = cache.clone()
    qkv = torch.randn(3, 9, 64).to(dtype)  # k and v as views of a merged qkv output
    k, v = qkv[:, 3:6], qkv[:, 6:9]
    slots, pos = torch.tensor([1, 3, 0]), torch.tensor([0, 79, 41])
    torch.ops.xllm.store_kv(cache, 1, k, v, slots, pos)
    expected = before.clone()
    expected[1, 0, slots, pos] = k
    expected[1, 1, slots, pos] = v
    assert torch.equal(cache, expected)  # those rows, and nothing else


def test_store_kv_out_of_range_still_raises():
    cache = make_cache(3, 64, torch.float32, False)
    k = torch.randn(1, 3, 64)
    with pytest.raises((IndexError, RuntimeError)):
        torch.ops.xllm.store_kv(cache, 0, k, k, torch.tensor([0]), torch.tensor([MAX_LEN]))


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() != "AVX512",
    reason="an AVX2 CPU runs the AVX2 paths in the tests above already",
)
def test_avx2_paths_on_an_avx512_cpu():
    """ATEN_CPU_CAPABILITY=avx2 (a child pytest): the AVX2 decode attention and the AVX2 build of
    the fused norm/rotary/silu loops (xllm_cpu_avx2.cpp), which an AVX2-only CPU runs, pass this
    file's and test_fused_ops.py's checks on an AVX512 CI machine too."""
    here = os.path.dirname(__file__)
    tests = [os.path.join(here, name) for name in ("test_decode_attention.py", "test_fused_ops.py")]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests,
         "-k", "not avx2_paths_on"],
        env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"},
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
