"""Prefix sharing by page aliasing: a new sequence whose tokens start with the tokens of another
sequence (running, or finished and kept in an LRU store) gets that sequence's *physical* KV pages
mapped into its own slot's virtual range (runtime/page_pool.py: one page at several addresses),
and prefills only the rest. The page that holds the end of the shared prefix is copied (the new
sequence writes its own tokens after it); every page wholly inside the prefix is shared, read
only: a sequence writes positions >= its cached length only, and those lie past the shared pages.
Attention still reads one contiguous range per sequence: no block table.

Finding a prefix: the tokens are hashed in blocks of BLOCK as a chain (a block's hash covers
every token before it), and an index maps each chain hash to the entries holding those tokens.
A new prompt walks its chain while the index knows it, then the candidate entries are compared
token by token (a hash collision costs a miss, never wrong KV) and extended past the last block.

Entries are live (a running sequence: its KV in its slot, `num_cached` valid tokens) or stored
(a finished one: its pages held by `PagePool.retain`, no slot). Stored entries go least recently
used first when the pool runs short (`evict`, the KV cache's reclaim hook), before any running
sequence is preempted. A sequence whose prefix is being prefilled by another right now waits one
step (`Match.defer`), so n completions of one prompt, or a burst of requests sharing a system
prompt, compute it once.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from xllm_compile.runtime.paged_kv_cache import PagedKVCache, SharedPrefix
from xllm_compile.runtime.sequence import Sequence

BLOCK = 16  # tokens per hashed block (vLLM's block size)
MAX_STORED = 4096  # finished sequences kept at most (besides the memory bound)


@dataclass
class PrefixStats:
    queries: int = 0  # prompt tokens looked up (vLLM's prefix_cache_queries)
    hits: int = 0  # of those, tokens whose KV was reused (prefix_cache_hits)
    requests_hit: int = 0  # admitted sequences that reused a prefix
    pages_shared: int = 0  # virtual pages mapped to another sequence's physical page
    pages_copied: int = 0  # partial last pages copied
    deferred: int = 0  # admissions that waited a step for a prefix being prefilled
    evictions: int = 0  # stored entries dropped for memory or count
    stored: int = 0  # stored entries now

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


@dataclass(eq=False)
class _Entry:
    seq: Sequence | None  # live: the sequence whose slot holds the KV
    tokens: list[int] | None = None  # stored: the tokens whose KV the pages hold
    pages: list[list[int]] | None = None  # stored: retained physical pages, per region
    hashes: list[int] = field(default_factory=list)  # chain hashes registered in the index

    @property
    def num_cached(self) -> int:
        return self.seq.num_cached if self.seq is not None else len(self.tokens)

    def token_ids(self) -> list[int]:
        return self.seq.all_ids if self.seq is not None else self.tokens

    @property
    def prefilling(self) -> bool:
        """A live sequence still computing its prompt (more of it is coming)."""
        return self.seq is not None and self.seq.num_cached < self.seq.num_tokens


@dataclass
class Match:
    entry: _Entry | None
    num_tokens: int  # tokens whose KV can be reused now
    defer: bool = False  # a prefill in flight will soon offer more: wait a step


def chain_hashes(tokens: list[int], num_blocks: int, have: list[int] | None = None) -> list[int]:
    """The chain hashes of the first `num_blocks` blocks (extending `have`, a prefix of them)."""
    out = list(have or [])
    h = out[-1] if out else 0
    for i in range(len(out), num_blocks):
        h = hash((h, *tokens[i * BLOCK : (i + 1) * BLOCK]))
        out.append(h)
    return out


def _common(a: list[int], b: list[int], start: int, limit: int) -> int:
    """Length of the common prefix of a and b, given that they agree on [0, start), up to limit."""
    n = start
    while n < limit and a[n] == b[n]:
        n += 1
    return n


class PrefixCache:
    """The index of reusable prefixes over one paged KV cache; the scheduler drives it."""

    def __init__(self, kv_cache: PagedKVCache, max_stored: int = MAX_STORED) -> None:
        self.kv = kv_cache
        self.pool = kv_cache.pool
        self.max_stored = max_stored
        self.stats = PrefixStats()
        self._index: dict[int, dict[_Entry, None]] = {}
        self._live: dict[int, _Entry] = {}  # seq_id -> its entry
        self._stored: OrderedDict[_Entry, None] = OrderedDict()  # least recently used first
        # worth sharing: at least one whole page (or one block, whichever is more)
        self.min_tokens = max(BLOCK, -(-kv_cache.pool.page_size // kv_cache.plan.row_bytes))
        kv_cache.reclaim = self.evict

    # -- lookup and admission --

    def lookup(self, seq: Sequence) -> Match:
        """The longest reusable prefix of `seq`'s tokens, leaving at least one to compute."""
        tokens = seq.all_ids
        limit = len(tokens) - 1
        if len(seq.block_hashes) < limit // BLOCK:
            seq.block_hashes = chain_hashes(tokens, limit // BLOCK, seq.block_hashes)
        hashes = seq.block_hashes[: limit // BLOCK]
        depth, found = 0, None
        for h in hashes:
            entries = self._index.get(h)
            if not entries:
                break
            depth, found = depth + 1, entries
        if not found:
            return Match(None, 0)
        best, best_n, coming = None, 0, 0
        head = tokens[: depth * BLOCK]
        for entry in found:
            ids = entry.token_ids()
            if ids[: depth * BLOCK] != head:
                continue  # a hash collision
            n = _common(ids, tokens, depth * BLOCK, min(limit, len(ids)))
            if entry.prefilling:  # its KV so far now, all n of them once its prefill is done
                coming = max(coming, n)
            n = min(n, entry.num_cached)
            if n > best_n:
                best, best_n = entry, n
        if best_n < self.min_tokens:
            best, best_n = None, 0
        defer = coming - best_n >= self.min_tokens
        return Match(best, best_n, defer)

    def shared(self, match: Match) -> SharedPrefix | None:
        """What `PagedKVCache.allocate` maps for `match` (None: nothing to share)."""
        if match.entry is None:
            return None
        entry = match.entry
        if entry.seq is not None:
            pages = self.kv.slot_pages(entry.seq.slot, match.num_tokens)
        else:
            need = self.kv.pages_for(match.num_tokens) // self.kv.plan.regions
            pages = [region[:need] for region in entry.pages]
            self._stored.move_to_end(entry)
        return SharedPrefix(match.num_tokens, pages)

    def admitted(self, seq: Sequence, match: Match | None, shared: SharedPrefix | None) -> None:
        """`seq` got its slot (with `shared` mapped): count it and index its tokens."""
        self.stats.queries += len(seq.prompt_ids)
        if shared is not None:
            self.stats.hits += min(match.num_tokens, len(seq.prompt_ids))
            self.stats.requests_hit += 1
            self.stats.pages_shared += shared.num_full(self.kv)
            self.stats.pages_copied += shared.num_partial(self.kv)
        entry = _Entry(seq)
        self._live[seq.seq_id] = entry
        # its prompt's blocks now: a sequence arriving next step defers to this prefill
        self._register(entry, len(seq.all_ids) // BLOCK)

    def update(self, seqs: list[Sequence]) -> None:
        """After a step: index the blocks the step completed (generated tokens too)."""
        for seq in seqs:
            entry = self._live.get(seq.seq_id)
            if entry is not None and seq.num_cached // BLOCK > len(entry.hashes):
                self._register(entry, seq.num_cached // BLOCK)

    # -- leaving a slot --

    def keep(self, seq: Sequence) -> None:
        """`seq` is done and its slot is about to be freed: keep its KV as a stored entry."""
        entry = self._live.pop(seq.seq_id, None)
        if entry is None:
            return
        n = seq.num_cached
        if n < self.min_tokens:
            self._unregister(entry)
            return
        entry.tokens, entry.seq = seq.all_ids[:n], None
        entry.pages = self.kv.slot_pages(seq.slot, n)
        for region in entry.pages:
            for page in region:
                self.pool.retain(page)
        self._trim(entry, n // BLOCK)
        self._stored[entry] = None
        self.stats.stored = len(self._stored)
        while len(self._stored) > self.max_stored:
            self._drop(next(iter(self._stored)))

    def forget(self, seq: Sequence) -> None:
        """`seq` leaves its slot and its KV goes with it (preempted, failed)."""
        entry = self._live.pop(seq.seq_id, None)
        if entry is not None:
            self._unregister(entry)

    def evict(self, num_pages: int) -> None:
        """Drop stored entries, least recently used first, until `num_pages` pages came free
        (or none is left). Pages another sequence still maps stay until it lets go."""
        start = self.pool.num_free
        while self._stored and self.pool.num_free - start < num_pages:
            self._drop(next(iter(self._stored)))

    def clear(self) -> None:
        while self._stored:
            self._drop(next(iter(self._stored)))

    # -- the index --

    def _register(self, entry: _Entry, num_blocks: int) -> None:
        seq = entry.seq
        if len(seq.block_hashes) < num_blocks:
            seq.block_hashes = chain_hashes(seq.all_ids, num_blocks, seq.block_hashes)
        for h in seq.block_hashes[len(entry.hashes) : num_blocks]:
            self._index.setdefault(h, {})[entry] = None
        entry.hashes = seq.block_hashes[:num_blocks]

    def _trim(self, entry: _Entry, num_blocks: int) -> None:
        for h in entry.hashes[num_blocks:]:
            self._remove(h, entry)
        del entry.hashes[num_blocks:]

    def _unregister(self, entry: _Entry) -> None:
        self._trim(entry, 0)

    def _remove(self, h: int, entry: _Entry) -> None:
        entries = self._index.get(h)
        if entries is not None:
            entries.pop(entry, None)
            if not entries:
                del self._index[h]

    def _drop(self, entry: _Entry) -> None:
        del self._stored[entry]
        self._unregister(entry)
        for region in entry.pages:
            for page in region:
                self.pool.drop(page)
        entry.pages = None
        self.stats.evictions += 1
        self.stats.stored = len(self._stored)
