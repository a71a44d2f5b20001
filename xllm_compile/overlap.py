"""--overlap auto: which overlap of compute and communication each step size gets.

A tensor-parallel program is one for every step size, and the overlap passes pay only for some:
splitting a step (chunk_allreduce, microbatch_overlap) hides all-reduces behind compute when
there are enough rows to split, and costs extra collectives (~0.2-0.4 ms each on gloo here)
when there are not. So the compiler builds one program per *variant*:

    base        the pipeline as asked (schedule_collectives moves what it can)
    chunk       + chunk_allreduce (each row-parallel matmul and all-reduce in k=2 token chunks)
    chunk4      + chunk_allreduce with k=4
    microbatch  + microbatch_overlap (each row-wise region in two interleaved halves)

and the cost model (passes/cost_model.py) predicts each variant's step time at a few step sizes
from per-node times measured here and a measured all-reduce profile (comm_profile.py). A variant
must beat base by MARGIN at a size to be chosen there. The choice is a table of token-count
bounds (buckets.select_variant reads it at run time, on every rank); the artifact holds only
the variants some size uses. The predictions go into the pass log (an "overlap_choice" entry)
and the manifest, where tools/bench/bench_tp.py reads them to print predicted vs measured.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from dataclasses import dataclass, field

import torch

from xllm_compile.buckets import select_variant
from xllm_compile.config import ModelConfig

log = logging.getLogger(__name__)

# variant -> the passes it adds, with their options
VARIANTS: dict[str, dict[str, dict]] = {
    "base": {},
    "chunk": {"chunk_allreduce": {"chunks": 2}},
    "chunk4": {"chunk_allreduce": {"chunks": 4}},
    "microbatch": {"microbatch_overlap": {}},
}
OVERLAP_PASSES = frozenset({"chunk_allreduce", "microbatch_overlap"})
# passes from the first of these on run once per variant; those before, once per rank
TAIL_FROM = ("chunk_allreduce", "microbatch_overlap", "fuse_allreduce_norm", "schedule_collectives")
SIZES = (1, 16, 128, 512, 1024)  # token counts the cost model measures (up to max_num_tokens)
MARGIN = 0.03  # a variant must predict 3% less than base to be chosen at a size


@dataclass
class Choice:
    """The cost model's answer: per variant its predicted costs at `sizes`, and the table."""

    sizes: list[int]
    costs: dict[str, list[dict]] = field(default_factory=dict)  # variant -> StepCost dicts
    table: list[list] = field(default_factory=list)  # [[max_tokens | None, variant], ...]
    profile: dict | None = None
    reason: str = ""  # why only base was kept (no measurement), else ""
    time_s: float = 0.0

    @property
    def used(self) -> list[str]:
        return sorted({v for _, v in self.table}, key=list(VARIANTS).index)

    def record(self) -> dict:
        """The pass-log entry (the shape of PassManager's records)."""
        details = {"select": self.table, "sizes": self.sizes}
        details["predicted_ms"] = {
            v: [c["predicted_ms"] for c in costs] for v, costs in self.costs.items()
        }
        if self.reason:
            details["reason"] = self.reason
        replaced = {f"{v} variant": 1 for v in self.used if v != "base"}
        return {
            "name": "overlap_choice",
            "version": 1,
            "stats": {
                "nodes_before": 0,
                "nodes_after": 0,
                "matches": len(self.used) - 1,
                "replaced": replaced,
                "details": details,
            },
            "time_s": round(self.time_s, 4),
            "skipped": None,
        }

    def manifest(self) -> dict:
        return {
            "mode": "auto",
            "select": self.table,
            "sizes": self.sizes,
            "costs": self.costs,
            "profile": self.profile,
            "reason": self.reason or None,
        }


def wanted(cfg, pipeline) -> bool:
    """--overlap auto applies: a --tp compile whose pipeline names no overlap pass itself."""
    names = {p.name for p in pipeline}
    return cfg.tp > 1 and cfg.overlap == "auto" and not names & OVERLAP_PASSES


def split_pipeline(pipeline, variant: str):
    """(the passes run once per rank, the passes of `variant`'s tail) in pipeline order."""
    from xllm_compile.passes import PIPELINE

    extra = VARIANTS[variant]
    names = [p.name for p in pipeline] + list(extra)
    order = [cls.name for cls in PIPELINE]
    first = min((order.index(n) for n in TAIL_FROM), default=len(order))
    head = [p for p in pipeline if order.index(p.name) < first]
    tail = [
        cls(**extra.get(cls.name, {}))
        for cls in PIPELINE
        if cls.name in names and order.index(cls.name) >= first
    ]
    return head, tail


def fork(ep):
    """An independent copy of a program to run a variant's tail on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's pytree LeafSpec notice
        return copy.deepcopy(ep)


def variant_file(variant: str, rank: int) -> str:
    """program.microbatch.json, program.rank1.microbatch.json, ..."""
    from xllm_compile.artifact import PROGRAM, rank_file

    stem, _, suffix = PROGRAM.partition(".")
    return rank_file(f"{stem}.{variant}.{suffix}", rank)


def sizes_for(max_num_tokens: int) -> list[int]:
    sizes = [s for s in SIZES if s < max_num_tokens]
    return sorted({*sizes, min(max_num_tokens, max(SIZES))})


def step_shape(tokens: int, max_len: int, max_num_seqs: int) -> tuple[list[int], int]:
    """(query lengths, cached tokens each) of a representative step of `tokens` tokens:
    decode-shaped (one token for each of `tokens` sequences, 31 cached) up to max_num_seqs,
    else prefill-shaped (sequences of up to max_len tokens from an empty cache)."""
    if tokens <= max_num_seqs:
        return [1] * tokens, min(31, max_len - 1)
    n = math.ceil(tokens / max_len)
    return [tokens // n + (i < tokens % n) for i in range(n)], 0


def step_args(config: ModelConfig, query_lens: list[int], cached: int, dtype) -> list:
    """The program's index inputs and a zeroed KV cache for one step: sequences of
    `query_lens` new tokens after `cached` tokens each."""
    tokens = sum(query_lens)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (tokens,), generator=g)
    positions = torch.cat([torch.arange(cached, cached + q) for q in query_lens])
    slots = torch.arange(len(query_lens))
    lens = torch.tensor(query_lens)
    kv = torch.zeros(
        (config.num_layers, 2, len(query_lens), cached + max(query_lens))
        + (config.num_kv_heads, config.head_dim),
        dtype=dtype,
    )
    ends = lens.cumsum(0) - 1
    return [ids, positions, slots.repeat_interleave(lens), slots, lens, lens + cached, ends, kv]


def choose(programs: dict, params: list, config, cfg, max_len: int, profile) -> Choice:
    """Predict every variant (`programs`: variant -> rank 0's optimized ExportedProgram) at
    each size and build the table. `profile`: a CommProfile, or the reason there is none."""
    from xllm_compile.passes.cost_model import step_cost

    start = time.perf_counter()
    sizes = sizes_for(cfg.max_num_tokens)
    choice = Choice(sizes=sizes)
    if isinstance(profile, str):
        choice.reason, choice.table = profile, [[None, "base"]]
        return choice
    choice.profile = profile.to_dict()
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // cfg.tp))  # a rank's share, as at run time
    try:
        for variant, ep in programs.items():
            costs = []
            for tokens in sizes:
                shape = step_shape(tokens, max_len, cfg.max_num_seqs)
                args = step_args(config, *shape, cfg.torch_dtype)
                reps = 2 if tokens < 512 else 1  # a large step's time is stable; and it is long
                cost = step_cost(
                    ep.graph_module, [*params, *args], profile.all_reduce_s, reps, profile.overlap
                )
                costs.append(cost.to_dict())
            choice.costs[variant] = costs
    finally:
        torch.set_num_threads(threads)
    choice.table = table(sizes, winners(choice.costs))
    choice.time_s = time.perf_counter() - start
    log.info("overlap choice: %s", choice.table)
    return choice


def winners(costs: dict[str, list[dict]]) -> list[str]:
    """Per size, the variant predicted fastest, if it beats base by MARGIN; else base."""
    out = []
    for i in range(len(costs["base"])):
        base = costs["base"][i]["predicted_ms"]
        best = min(costs, key=lambda v: costs[v][i]["predicted_ms"])
        gain = base - costs[best][i]["predicted_ms"]
        out.append(best if gain > MARGIN * base else "base")
    return out


def table(sizes: list[int], winners: list[str]) -> list[list]:
    """[[bound, variant], ...]: a step of T tokens takes the variant of the first bound >= T;
    consecutive sizes with one winner share an entry; the last bound is None (any larger)."""
    out: list[list] = []
    for size, winner in zip(sizes, winners, strict=True):
        if out and out[-1][1] == winner:
            out[-1][0] = size
        else:
            out.append([size, winner])
    out[-1][0] = None
    assert select_variant(out, sizes[0]) == winners[0]
    return out
