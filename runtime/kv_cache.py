"""The KV cache behind a small interface: a tensor [L, 2, S, M, Hkv, D] that the program writes
in place, and slot allocation (one contiguous [M, Hkv, D] region per sequence and layer).

`ContiguousKVCache` preallocates every slot; `PagedKVCache` (paged_kv_cache.py) implements the
same interface and maps pages into a slot only as its sequence grows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class KVCache(ABC):
    """Owns the cache tensor and which sequence holds which slot."""

    tensor: torch.Tensor  # [L, 2, S, M, Hkv, D]

    @property
    def num_slots(self) -> int:
        return self.tensor.shape[2]

    @property
    def max_len(self) -> int:
        return self.tensor.shape[3]

    @abstractmethod
    def can_allocate(self, num_tokens: int) -> bool:
        """Whether a new sequence needing `num_tokens` positions can get a slot now."""

    @abstractmethod
    def allocate(self, num_tokens: int) -> int:
        """Reserve a slot for a new sequence and return it; RuntimeError if none is free."""

    @abstractmethod
    def grow(self, slot: int, num_tokens: int) -> bool:
        """Make positions [0, num_tokens) of `slot` writable; False if memory ran out."""

    @abstractmethod
    def free(self, slot: int) -> None:
        """Return the slot (and its memory) to the cache."""


class ContiguousKVCache(KVCache):
    """Every slot preallocated at max length: simple, and wasteful for short sequences.

    Zero-filled for determinism; attention never reads past a sequence's own length.
    """

    def __init__(self, num_layers, num_slots, max_len, num_kv_heads, head_dim, dtype, device):
        shape = (num_layers, 2, num_slots, max_len, num_kv_heads, head_dim)
        self.tensor = torch.zeros(shape, dtype=dtype, device=device)
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first

    def can_allocate(self, num_tokens: int) -> bool:
        return bool(self._free) and num_tokens <= self.max_len

    def allocate(self, num_tokens: int) -> int:
        if not self.can_allocate(num_tokens):
            raise RuntimeError("KV cache has no free slot")
        return self._free.pop()

    def grow(self, slot: int, num_tokens: int) -> bool:
        return num_tokens <= self.max_len

    def free(self, slot: int) -> None:
        assert slot not in self._free, f"slot {slot} freed twice"
        self._free.append(slot)

    @property
    def num_free_slots(self) -> int:
        return len(self._free)
