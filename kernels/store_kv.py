"""`xllm::store_kv`: write this step's keys and values into the runtime-owned KV cache, in place.

The cache is one tensor [L, 2, S, M, Hkv, D]: layer, key/value, sequence slot, position, KV head,
head dim. Each sequence owns a contiguous [M, Hkv, D] region per layer (its slot), so attention
reads contiguous per-sequence KV with no block-table indirection.

The op declares `mutates_args=("kv_cache",)` and returns nothing. torch.export keeps it as a plain
in-place call as long as the program never goes through `run_decompositions` (which would turn it
into `auto_functionalized` and clone the whole cache every step; see DESIGN.md).
"""

from __future__ import annotations

import torch

from xllm_compile.kernels.cpu import dispatch_or_fallback


@torch.library.custom_op("xllm::store_kv", mutates_args=("kv_cache",))
def store_kv(
    kv_cache: torch.Tensor,  # [L, 2, S, M, Hkv, D]
    layer: int,
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    token_slots: torch.Tensor,  # [T] slot of each token's sequence
    positions: torch.Tensor,  # [T] position of each token
) -> None:
    """Reference implementation (also the CPU path): one indexed write per tensor."""
    kv_cache[layer, 0, token_slots, positions] = k.to(kv_cache.dtype)
    kv_cache[layer, 1, token_slots, positions] = v.to(kv_cache.dtype)


def store_kv_reference(kv_cache, layer, k, v, token_slots, positions) -> None:
    kv_cache[layer, 0, token_slots, positions] = k.to(kv_cache.dtype)
    kv_cache[layer, 1, token_slots, positions] = v.to(kv_cache.dtype)


@store_kv.register_kernel("cpu")
def _(kv_cache, layer, k, v, token_slots, positions) -> None:
    # C++ (kernels/cpu) when it builds: saves the Python op wrapper (~37 us per call, x layers)
    dispatch_or_fallback(
        "store_kv", store_kv_reference, kv_cache, layer, k, v, token_slots, positions
    )


@store_kv.register_fake
def _(kv_cache, layer, k, v, token_slots, positions) -> None:
    return None
