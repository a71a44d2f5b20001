"""Shape buckets for the runtime's graph cache, chosen at compile time and stored in the manifest:
decode batch sizes, prefill token counts and KV-length bounds. Pure functions, shared by the
compiler and the runtime."""

from __future__ import annotations

from xllm_compile.errors import ConfigError


def decode_batch_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """1, 2, 4, 8, then steps of 8 up to 32 and of 16 after, always ending at max_num_seqs."""
    sizes = [1, 2, 4, 8, *range(16, 33, 8), *range(48, max_num_seqs + 1, 16)]
    return tuple(sorted({s for s in sizes if s < max_num_seqs} | {max_num_seqs}))


def kv_len_buckets(max_len: int, smallest: int = 64) -> tuple[int, ...]:
    """Powers of two from `smallest`, ending at max_len."""
    sizes, n = set(), smallest
    while n < max_len:
        sizes.add(n)
        n *= 2
    return tuple(sorted(sizes | {max_len}))


# Prefill steps above this many tokens are compute-bound: launch overhead is amortized and a
# captured graph buys nothing, while its static attention bound grows as tokens x kv length
# (vLLM caps its CUDA-graph capture sizes at 512 tokens for the same reason).
MAX_PREFILL_BUCKET = 512


def prefill_token_buckets(max_num_tokens: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from `smallest` up to min(max_num_tokens, MAX_PREFILL_BUCKET), plus
    max_num_tokens itself when it is under that cap. Larger prefills run unbucketed."""
    cap = min(max_num_tokens, MAX_PREFILL_BUCKET)
    sizes, n = {cap}, smallest
    while n < cap:
        sizes.add(n)
        n *= 2
    return tuple(sorted(sizes))


def bucket_for(n: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket >= n, or None when n is larger than every bucket."""
    for size in buckets:
        if size >= n:
            return size
    return None


def fit(buckets, limit: int) -> tuple[int, ...]:
    """The buckets up to `limit`, plus `limit` itself so that every size up to it has a bucket."""
    return tuple(sorted({b for b in buckets if b < limit} | {limit}))


def cover(buckets, limit: int) -> tuple[int, ...]:
    """The buckets needed to hold every size up to `limit`: those under it and the smallest at
    or above it (`limit` itself if none is). Unlike `fit`, it keeps the compile-time buckets a
    runtime with a smaller limit uses, so their compile-time plans still apply."""
    above = [b for b in buckets if b >= limit]
    return tuple(sorted({b for b in buckets if b < limit} | {min(above, default=limit)}))


def parse_buckets(
    spec: str | None, max_num_seqs: int, max_len: int, max_num_tokens: int | None = None
) -> dict[str, list[int]]:
    """`--buckets "decode=1,2,4,8;prefill=16,64,256;kv=64,256"` (every part optional) -> the
    manifest's buckets; missing parts take the defaults; decode and kv lists are completed up to
    their limit, prefill sizes above max_num_tokens are dropped (`prefill=` alone: none)."""
    max_num_tokens = max_num_tokens or max_len
    chosen = {
        "decode": decode_batch_buckets(max_num_seqs),
        "prefill": prefill_token_buckets(max_num_tokens),
        "kv": kv_len_buckets(max_len),
    }
    for part in filter(None, (spec or "").replace(" ", "").split(";")):
        name, _, values = part.partition("=")
        if name not in chosen or (not values and name != "prefill"):
            raise ConfigError(f"--buckets {spec!r}: expected 'decode=1,2,4;prefill=16,64;kv=64'")
        try:
            sizes = [int(v) for v in values.split(",") if v]
        except ValueError:
            raise ConfigError(f"--buckets {spec!r}: sizes must be integers") from None
        if any(s < 1 for s in sizes):
            raise ConfigError(f"--buckets {spec!r}: sizes must be positive")
        chosen[name] = sizes
    return {
        "decode_batch": list(fit(chosen["decode"], max_num_seqs)),
        "prefill_tokens": sorted({s for s in chosen["prefill"] if s <= max_num_tokens}),
        "kv_len": list(fit(chosen["kv"], max_len)),
    }


def prefill_batch_buckets(decode_batches, max_num_seqs: int) -> tuple[int, ...]:
    """Batch buckets of prefill steps: the decode ones, and one holding max_num_seqs + 1 (a
    prefill of every sequence may need a padding sequence to take the padding tokens)."""
    extra = {max_num_seqs + 1} if max(decode_batches) <= max_num_seqs else set()
    return tuple(sorted({*decode_batches, *extra}))


def step_shapes(buckets: dict, max_num_seqs: int) -> list[tuple[int, int]]:
    """(tokens, sequences) of every step shape the graph cache can run, for `buckets` as stored
    in the manifest: decode (B, B) per batch bucket, prefill (T, B) per token bucket and batch
    bucket up to T. Each sequence yields one logits row. KV-length buckets are left out: they
    multiply the list without changing the shapes the program computes with."""
    decode = fit(buckets["decode_batch"], max_num_seqs)
    shapes = [(b, b) for b in decode]
    for tp in buckets.get("prefill_tokens", ()):
        shapes += [(tp, b) for b in prefill_batch_buckets(decode, max_num_seqs) if b <= tp]
    return shapes


def select_variant(table, num_tokens: int) -> str:
    """The program variant of a step of `num_tokens` tokens, from the manifest's overlap table
    [[max_tokens | None, variant], ...] (overlap.py): the first entry whose bound holds it."""
    for bound, variant in table:
        if bound is None or num_tokens <= bound:
            return variant
    return table[-1][1]


# -- a step's bucket (the runtime's ModelRunner): keys are ("decode", Bp, Lb) and
# ("prefill", Tp, Bp, Lb); see runtime/model_runner.py for the padding they imply


def decode_key(batch: int, max_seq_len: int, batches, kv_lens) -> tuple | None:
    """The decode bucket of `batch` one-token sequences, the longest `max_seq_len` long."""
    bp, lb = bucket_for(batch, batches), bucket_for(max_seq_len, kv_lens)
    return None if bp is None or lb is None else ("decode", bp, lb)


def prefill_key(
    num_tokens: int, batch: int, max_seq_len: int, tokens, batches, kv_lens
) -> tuple | None:
    """The prefill bucket ("prefill", Tp, Bp, Lb) of a step, or None if none holds it. Every
    padding sequence holds at least one token, and some padding sequence must exist to take
    the padding tokens: Tp >= T + (Bp - B), and Bp > B whenever Tp > T."""
    if not tokens:
        return None
    lb, bp = bucket_for(max_seq_len, kv_lens), bucket_for(batch, batches)
    if lb is None or bp is None:
        return None
    tp = bucket_for(num_tokens + bp - batch, tokens)
    if tp is not None and tp > num_tokens and bp == batch:
        bp = bucket_for(batch + 1, batches)
        if bp is None:
            return None
        tp = bucket_for(num_tokens + bp - batch, tokens)
    return None if tp is None else ("prefill", tp, bp, lb)


def key_sizes(key: tuple) -> tuple[int, ...]:
    """Lengths of the seven index inputs (trace.INPUT_NAMES) of bucket `key`."""
    tp, bp = (key[1], key[1]) if key[0] == "decode" else (key[1], key[2])
    return (tp, tp, tp, bp, bp, bp, bp)


def all_keys(batches, kv_lens, tokens, prefill_batches) -> list[tuple]:
    """Every bucket a step can fall in, largest first (as CUDA-graph capture wants). Prefill
    buckets pair a token count only with batches up to it and kv lengths up to the kv bucket of
    that token count (prefills start from an empty cache)."""
    keys = [("decode", b, lb) for b in reversed(batches) for lb in reversed(kv_lens)]
    for tp in reversed(tokens):
        top = bucket_for(tp, kv_lens) or kv_lens[-1]
        keys += [
            ("prefill", tp, bp, lb)
            for bp in reversed(prefill_batches)
            if bp <= tp
            for lb in reversed(kv_lens)
            if lb <= top
        ]
    return keys


def pad_rows(rows: list[list[int]], key: tuple, pad_slot: int) -> list[int]:
    """A step's seven index rows padded to bucket `key`, flattened. Padding sequences sit in
    the scratch slot `pad_slot`, every token at position 0; a decode pad is a one-token
    sequence, a prefill pads with Bp - B sequences, the last taking the remaining tokens."""
    ids, positions, token_slots, seq_slots, query_lens, seq_lens, logits_idx = rows
    tp, bp = key_sizes(key)[2:4]
    pad_seqs, pad_tokens = bp - len(seq_slots), tp - len(ids)
    pad_lens = [1] * pad_seqs
    if pad_seqs:
        pad_lens[-1] += pad_tokens - pad_seqs
    ends, end = [], len(ids) - 1
    for n in pad_lens:
        end += n
        ends.append(end)
    return (
        [*ids, *[0] * pad_tokens]
        + [*positions, *[0] * pad_tokens]
        + [*token_slots, *[pad_slot] * pad_tokens]
        + [*seq_slots, *[pad_slot] * pad_seqs]
        + [*query_lens, *pad_lens]
        + [*seq_lens, *[1] * pad_seqs]
        + [*logits_idx, *ends]
    )
