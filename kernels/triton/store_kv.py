"""The KV write in Triton: one program per token writes its K and V rows (every KV head) at
(layer, slot, position) of the cache through the cache's own strides, so a page-pool view
(token-major or layer-major) is written in place."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(cache_ptr, k_ptr, v_ptr, slots_ptr, pos_ptr, layer_off, kv_stride,
                     s_stride, m_stride, h_stride, k_t, k_h, v_t, v_h, n_heads,
                     D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < n_heads) & (d < D)
    dst = cache_ptr + layer_off + slot * s_stride + pos * m_stride + h * h_stride + d
    k = tl.load(k_ptr + t * k_t + h * k_h + d, mask=mask)
    v = tl.load(v_ptr + t * v_t + h * v_h + d, mask=mask)
    tl.store(dst, k.to(tl.float32).to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + kv_stride, v.to(tl.float32).to(cache_ptr.dtype.element_ty), mask=mask)


def store_kv(kv_cache: torch.Tensor, layer: int, k, v, token_slots, positions) -> None:
    n_tokens, n_heads, d = k.shape
    if kv_cache.stride(-1) != 1:
        raise ValueError("the KV cache's head dim must be contiguous")
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    st = kv_cache.stride()
    if n_tokens:
        _store_kv_kernel[(n_tokens,)](
            kv_cache, k, v, token_slots, positions, layer * st[0], st[1], st[2], st[3], st[4],
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), n_heads, D=d,
            BLOCK_H=triton.next_power_of_2(n_heads), BLOCK_D=triton.next_power_of_2(d),
        )  # fmt: skip
