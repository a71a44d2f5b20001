"""Tensor parallelism as a compile stage, applied to the model from outside (gpt-fast's
`apply_tp`): the decoder is built with each rank's local sizes, its row-parallel linears end in
an all-reduce, and the full checkpoint is sliced per rank. The model code knows nothing of it.

Megatron layout, rank r of N:
    q/k/v_proj, gate/up_proj   column-parallel: rank r's heads / intermediate rows
    o_proj, down_proj          row-parallel: rank r's input columns, then all_reduce(sum),
                               then the bias (added once, after the sum)
    KV heads                   split; with fewer KV heads than ranks each is replicated on
                               N / Hkv ranks (as vLLM does): rank r keeps head r * Hkv // N
    embed_tokens               replicated (a gather of T rows: cheaper than a masked lookup
                               plus an all-reduce of [T, hidden])
    lm_head                    vocab-parallel when N divides the vocabulary: rank r's rows of
                               the vocabulary (of the embedding, when tied), its logits placed
                               in [N, V] and all-reduced, so every rank (rank 0 samples) holds
                               them whole;
                               replicated otherwise (each rank reads the whole head: at decode
                               it is the largest weight, 545 MB of Qwen2.5-0.5B in fp32)
    norms, q/k norms, rotary   replicated

The all-reduce is a functional collective (`_c10d_functional.all_reduce` + `wait_tensor`):
torch.export keeps both as graph nodes, so passes can move the wait, and the group they name
(GROUP, a placeholder) is bound to the real process group at load (program_format.bind_group).
The passes then merge the sharded q/k/v and gate/up of each rank, as for one rank.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from xllm_compile.config import ModelConfig
from xllm_compile.errors import ConfigError

GROUP = "xllm_tp"  # the group name traced into programs; bound at load


def check_tp(config: ModelConfig, tp: int) -> None:
    """Raises ConfigError (one line) when `tp` cannot split this model."""
    if tp < 1:
        raise ConfigError(f"--tp must be at least 1, got {tp}")
    bad = [
        f"{name}={value}"
        for name, value in (
            ("num_attention_heads", config.num_heads),
            ("intermediate_size", config.intermediate_size),
        )
        if value % tp
    ]
    kv = config.num_kv_heads
    if kv % tp and tp % kv:
        bad.append(f"num_key_value_heads={kv} (nor a divisor of it)")
    if bad:
        raise ConfigError(f"--tp {tp} does not divide {', '.join(bad)}; choose a divisor")


def local_config(config: ModelConfig, tp: int) -> ModelConfig:
    """The model one rank holds: its share of the heads and of the intermediate size."""
    return dataclasses.replace(
        config,
        num_heads=config.num_heads // tp,
        num_kv_heads=max(1, config.num_kv_heads // tp),
        intermediate_size=config.intermediate_size // tp,
    )


class RowParallelLinear(nn.Linear):
    """y = all_reduce(x @ W_r^T) + b: rank r's slice of the input columns, summed over ranks;
    the bias is added once, after the sum. Keeps nn.Linear's parameter names (HF names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        y = torch.ops._c10d_functional.all_reduce(y, "sum", GROUP)
        y = torch.ops._c10d_functional.wait_tensor(y)
        return y if self.bias is None else y + self.bias


class VocabParallelHead(nn.Module):
    """logits over the whole vocabulary from rank r's rows [r V/N, (r+1) V/N) of the head: each
    rank places its columns in a zero [N, V] and the ranks all-reduce it (adding zeros is
    exact). An all-gather would move N-fold fewer bytes, but this runs unchanged on the
    one-rank group the compiler checks the passes on, where a gather of N parts cannot."""

    def __init__(self, hidden: int, vocab: int, size: int, rank: int) -> None:
        super().__init__()
        part = vocab // size
        self.weight = nn.Parameter(torch.empty(part, hidden, device="meta"))
        self.before, self.after = rank * part, vocab - (rank + 1) * part

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = F.linear(hidden, self.weight)  # [N, V/size]
        full = F.pad(local, (self.before, self.after))  # [N, V], zeros but this rank's part
        full = torch.ops._c10d_functional.all_reduce(full, "sum", GROUP)
        return torch.ops._c10d_functional.wait_tensor(full)


def vocab_parallel(config: ModelConfig, tp: int) -> bool:
    return tp > 1 and config.vocab_size % tp == 0


def apply_tp(model: nn.Module, size: int, rank: int) -> nn.Module:
    """Make every o_proj and down_proj of rank `rank`'s (local-size) model row-parallel and,
    where `size` divides the vocabulary, its head vocab-parallel; in place."""
    config = model.config
    if vocab_parallel(config, size):
        head = VocabParallelHead(config.hidden_size, config.vocab_size, size, rank)
        model.lm_head = head.to(model.model.embed_tokens.weight.dtype)  # tied too: its slice
    for layer in model.model.layers:
        for parent, name in ((layer.self_attn, "o_proj"), (layer.mlp, "down_proj")):
            old = getattr(parent, name)
            new = RowParallelLinear(
                old.in_features, old.out_features, bias=old.bias is not None, device="meta"
            )
            setattr(parent, name, new.to(old.weight.dtype))
    return model


def shard_weights(
    weights: dict[str, torch.Tensor], config: ModelConfig, tp: int, rank: int
) -> dict[str, torch.Tensor]:
    """Rank `rank`'s slice of each full (HF-named) weight; replicated ones are shared, not
    copied."""
    d, heads, kv = config.head_dim, config.num_heads // tp, config.num_kv_heads
    q_rows = slice(rank * heads * d, (rank + 1) * heads * d)
    if kv >= tp:
        kv_local = kv // tp
        kv_rows = slice(rank * kv_local * d, (rank + 1) * kv_local * d)
    else:  # replicated KV heads: rank r serves the query heads of KV head r * kv // tp
        head = rank * kv // tp
        kv_rows = slice(head * d, (head + 1) * d)
    inter = config.intermediate_size // tp
    i_rows = slice(rank * inter, (rank + 1) * inter)
    vocab = config.vocab_size // tp
    v_rows = slice(rank * vocab, (rank + 1) * vocab)
    out = {}
    if vocab_parallel(config, tp):
        head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])  # tied: embed
        out["lm_head.weight"] = head[v_rows].clone()  # its own storage: the embedding stays
    for name, w in weights.items():
        if name in out:
            continue
        leaf = ".".join(name.split(".")[-2:])  # e.g. "q_proj.weight"
        if leaf in ("q_proj.weight", "q_proj.bias"):
            w = w[q_rows]
        elif leaf in ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"):
            w = w[kv_rows]
        elif leaf == "o_proj.weight":
            w = w[:, q_rows]
        elif leaf in ("gate_proj.weight", "gate_proj.bias", "up_proj.weight", "up_proj.bias"):
            w = w[i_rows]
        elif leaf == "down_proj.weight":
            w = w[:, i_rows]
        out[name] = w.contiguous() if w is not weights[name] else w
    return out
