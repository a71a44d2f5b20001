"""`RuntimeConfig`: every choice `load()` makes about running an artifact, with its default, in
one frozen dataclass; the CLI takes its flags' defaults from it."""

from __future__ import annotations

from dataclasses import dataclass

from xllm_compile.errors import ConfigError

KV_CACHES = ("paged", "contiguous")
GRAPH_BACKENDS = ("eager", "cpu_graph", "inductor", "cuda_graph", "torchair")


@dataclass(frozen=True)
class RuntimeConfig:
    """How to run an artifact.

    Args:
        device: run on this device instead of the one compiled for.
        max_num_seqs: KV-cache slots (concurrent sequences); default: the artifact's limit.
        verify: check every file's sha256 (size is always checked).
        kv_cache: "paged" (pages mapped as sequences grow; the default on cpu) or "contiguous"
            (every slot preallocated at max length; the default elsewhere).
        kv_memory: the paged cache's budget: bytes, or a fraction of the device's free memory.
        kv_page_size: bytes per KV page (a multiple of the OS / driver granularity); default:
            16 tokens of every layer's K and V, rounded up to that granularity.
        graph_cache: run steps through the multi-graph cache (True: the device's default
            backend, CUDA graphs on GPU, CPU graphs on the CPU (runtime/cpu_graph.py); or
            "eager" / "cpu_graph" / "inductor" / "cuda_graph"; "auto": CPU graphs for a
            one-rank artifact on the CPU, else none: the CLI's default).
        warmup: build every graph-cache bucket now instead of on first use.
        arena: run the graph cache's bucket programs over one activation arena laid out by the
            artifact's arena plans (None: yes with CUDA or CPU graphs, when the artifact has
            plans).
        trust: a file of trusted ed25519 public keys: refuse the artifact unless its manifest
            is signed by one of them (signing.py); None: integrity checks only.
        tp_timeout_s: a tensor-parallel artifact: how long a step may wait on the other
            ranks before the group is declared down (runtime/tp_group.py).
        max_num_batched_tokens: tokens in one step (decodes and prefill chunks together); a
            longer prompt is prefilled in chunks. Default: the artifact's --max-num-tokens,
            which also bounds it.
        prefix_caching: share the KV pages of prompt prefixes already computed (by running
            sequences, or finished ones kept until memory is needed): runtime/prefix_cache.py.
            None: on with the paged KV cache of a one-rank artifact.
    """

    device: str | None = None
    max_num_seqs: int | None = None
    verify: bool = True
    kv_cache: str | None = None
    kv_memory: int | float = 0.5
    kv_page_size: int | None = None
    graph_cache: bool | str = False
    warmup: bool = False
    arena: bool | None = None
    trust: str | None = None
    tp_timeout_s: float = 30.0
    max_num_batched_tokens: int | None = None
    prefix_caching: bool | None = None

    def __post_init__(self) -> None:
        if self.kv_cache is not None and self.kv_cache not in KV_CACHES:
            raise ConfigError(f"kv_cache must be 'paged' or 'contiguous', got {self.kv_cache!r}")
        if self.graph_cache not in (False, True, "auto", *GRAPH_BACKENDS):
            raise ConfigError(
                f"graph_cache must be a bool or one of {', '.join(GRAPH_BACKENDS)}, "
                f"got {self.graph_cache!r}"
            )
        if not self.kv_memory > 0:
            raise ConfigError(f"kv_memory must be positive, got {self.kv_memory}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ConfigError(
                f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}"
            )
        if not self.tp_timeout_s > 0:
            raise ConfigError(f"tp_timeout_s must be positive, got {self.tp_timeout_s}")

    @property
    def graph_backend(self) -> str | None:
        """The graph cache's backend, None for the device's default."""
        return None if self.graph_cache is True else self.graph_cache or None
