"""Loads an artifact into a ready Engine: verifies it, loads the program and binds the weights."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

import xllm_compile.kernels  # noqa: F401  (registers the xllm:: ops the program calls)
from xllm_compile import arena_plans, artifact, program_format, signing
from xllm_compile.backend import check_device
from xllm_compile.config import DTYPES, ModelConfig
from xllm_compile.errors import ArtifactError, ConfigError, RequestError, XllmError
from xllm_compile.runtime.config import RuntimeConfig
from xllm_compile.runtime.engine import Engine
from xllm_compile.runtime.kv_cache import ContiguousKVCache, KVCache
from xllm_compile.runtime.model_runner import ModelRunner
from xllm_compile.runtime.paged_kv_cache import KVGeometry, PagedKVCache, build_paged_kv_cache
from xllm_compile.runtime.sampler import SamplingParams
from xllm_compile.runtime.step_programs import StepPrograms
from xllm_compile.runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def load(path: str | Path, config: RuntimeConfig | None = None, **overrides) -> Engine:
    """Load an artifact directory into an Engine, run as `config` says (RuntimeConfig's
    fields, or any of them as keyword arguments: `load(ART, graph_cache=True)`).

    Raises:
        ArtifactError: the artifact is missing, corrupt, tampered with or from another version.
        ConfigError: a bad choice, a budget below one max-length sequence, or an arena asked
            for where none can be used (no graph cache, Inductor, no usable plans).
        BackendUnavailableError: the device (or its page mapping) is not available here.
    """
    try:
        c = dataclasses.replace(config or RuntimeConfig(), **overrides)
    except TypeError as e:  # an unknown keyword
        raise ConfigError(f"load(): {e}") from None
    device, max_num_seqs, verify = c.device, c.max_num_seqs, c.verify
    kv_cache, kv_memory, kv_page_size = c.kv_cache, c.kv_memory, c.kv_page_size
    graph_cache, warmup, arena, trust = c.graph_cache, c.warmup, c.arena, c.trust
    if trust is not None:
        signing.verify(Path(path), signing.read_trusted(Path(trust)))
    art = artifact.open_artifact(path, verify=verify)
    m = art.manifest
    device = device or m["device"]
    check_device(device)
    if device.startswith("npu"):  # the xllm:: ops on the npu key, through the kernel registry
        from xllm_compile.kernels.npu import register

        register()
    tp_size = (m.get("tp") or {}).get("size", 1)
    if graph_cache == "auto":  # CPU graphs where they apply (runtime/cpu_graph.py), torchair on npu
        one = tp_size == 1
        graph_cache = "cpu_graph" if one and device == "cpu" else False
        if one and device.startswith("npu"):
            graph_cache = "torchair"
        c = dataclasses.replace(c, graph_cache=graph_cache)
    if tp_size > 1:
        device = _check_tp(art, device, tp_size, graph_cache)
    graph_module = _load_program(art)
    programs = _load_variants(art, graph_module, 0)
    params = _load_params(art, m["program"]["params"], device)
    config = _model_config(art)
    named = dict(zip(m["program"]["params"], params, strict=True))
    _check_config(art, config, graph_module, named)
    limits = m["limits"]
    num_seqs = max_num_seqs or limits["max_num_seqs"]
    geometry = KVGeometry(
        config.num_layers,
        num_seqs + (1 if graph_cache else 0),  # the graph cache holds one scratch slot
        limits["max_model_len"],
        _kv_heads(art, config),
        config.head_dim,
        DTYPES[m["dtype"]],
    )
    cache = _make_kv_cache(kv_cache, geometry, device, kv_memory, kv_page_size)
    runner = ModelRunner(programs, params, device)
    if tp_size > 1:
        cache = _start_tp(art, runner, cache, geometry, kv_cache, tp_size, c.tp_timeout_s)
    runner.kv_cache = cache  # where buckets take their scratch slot (journaled under --tp)
    tokenizer = None
    if m.get("tokenizer"):  # the tokenizer files the manifest lists and hashes, no others
        files = [f for f in m["tokenizer"].get("files", []) if art.has(f)]
        tokenizer = Tokenizer(art.path, files)
    prefix = c.prefix_caching
    if prefix is None:  # the paged cache of one rank (a --tp artifact's ranks would all alias)
        prefix = isinstance(cache, PagedKVCache)
    elif prefix and not isinstance(cache, PagedKVCache):
        raise ConfigError(
            "prefix caching maps shared KV pages: it needs kv_cache='paged' on one rank"
        )
    engine = Engine(
        runner,
        cache,
        tokenizer,
        _eos_token_ids(art, config),
        num_seqs,
        limits["max_num_tokens"],
        m,
        max_num_batched_tokens=c.max_num_batched_tokens,
        prefix_caching=prefix,
    )
    engine.sampling_defaults = _sampling_defaults(art)
    if graph_cache:
        from xllm_compile.runtime.model_runner import attach_graph_cache

        backend = c.graph_backend
        if backend is None and tp_size > 1:
            backend = "eager"  # _check_tp: a --tp artifact runs the eager graph cache only
        if backend == "cuda_graph" and not device.startswith("cuda"):
            raise ConfigError(
                f"graph cache 'cuda_graph' needs a CUDA device, and this runs on {device}: "
                "use eager or inductor"
            )
        cuda_graphs = backend == "cuda_graph" or (backend is None and device.startswith("cuda"))
        # the default: with a recorded graph (CUDA or CPU), whose outputs then stay in place
        cpu_graphs = backend == "cpu_graph" or (backend is None and not device.startswith("cuda"))
        wanted = arena or (arena is None and (cuda_graphs or cpu_graphs))
        plans = read_arena_plans(art, graph_module) if wanted else []
        if arena and (not plans or backend == "inductor"):
            why = (
                "Inductor plans its own buffers"
                if plans
                else "the artifact has no usable arena plans (recompile it)"
            )
            raise ConfigError(f"arena: {why}")
        attach_graph_cache(
            engine,
            warmup=warmup,
            max_num_seqs=num_seqs,
            backend=backend,
            buckets=m.get("buckets"),
            arena_plans=plans,
            arena=arena,
        )
    elif arena:
        raise ConfigError("arena: the activation arena runs with the graph cache; enable it too")
    return engine


def _check_tp(art: artifact.Artifact, device: str, size: int, graph_cache) -> str:
    """Where rank 0 of a --tp artifact runs (rank r: <device>:r, runtime/tp_group.py), after
    the checks: the eager graph cache or none; one device per rank on this machine."""
    from xllm_compile.runtime.tp_group import rank_device, torchrun_rank

    kind = torch.device(device).type
    eager = graph_cache in (False, "eager") or (graph_cache is True and kind == "cpu")
    if not eager:  # graph_cache=True off the CPU means CUDA graphs; on it, eager for --tp
        raise ConfigError(
            f"{art.path} is a --tp {size} artifact: it runs with the eager graph cache or none, "
            "for now"
        )
    if kind == "cpu":
        return "cpu"
    module = getattr(torch, kind, None)
    have = module.device_count() if module is not None and module.is_available() else 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", size)) if torchrun_rank() is not None else size
    if have < local:
        raise ConfigError(
            f"{art.path} is a --tp {size} artifact: on {kind} it needs {local} devices on this "
            f"machine, one per rank, and {have} are visible"
        )
    return rank_device(device, torchrun_rank() or 0)


def _kv_heads(art: artifact.Artifact, config: ModelConfig) -> int:
    """KV heads of one rank's cache: all of them, or a --tp artifact's share of them."""
    tp_info = art.manifest.get("tp") or {}
    return tp_info.get("local", {}).get("num_kv_heads", config.num_kv_heads)


def _start_tp(art, runner, cache, geometry, kv_kind, size: int, timeout_s: float):
    """Start ranks 1..size-1 (each builds its cache like this one: same geometry and pages)
    and make `runner` send every step to them; returns rank 0's journaled cache."""
    from xllm_compile.runtime.tp_group import JournaledKVCache, TPGroup

    threads = max(1, torch.get_num_threads() // size)
    torch.set_num_threads(threads)  # one share of the cores per rank (this process is one)
    if runner.device.type != "cpu":  # NCCL / HCCL use the current device
        getattr(torch, runner.device.type).set_device(runner.device)
    pool = getattr(cache, "pool", None)
    options = {
        "geometry": dataclasses.asdict(geometry) | {"dtype": str(geometry.dtype)},
        "kv_cache": kv_kind or ("paged" if pool is not None else "contiguous"),
        "kv_memory": pool.page_size * pool.num_pages if pool is not None else 0,
        "kv_page_size": pool.page_size if pool is not None else None,
        "threads": threads,
        "device": torch.device(runner.device).type,
    }
    group = TPGroup(art.path, size, options, timeout_s)
    for program in runner.programs:
        program_format.bind_group(program, group.group_name)
    journal = JournaledKVCache(cache)
    runner.attach_tp(group, journal)
    return journal


def load_rank(path: Path, rank: int, group_name: str, options: dict):
    """A worker rank's runner (its programs bound to `group_name`, its weights) and KV cache
    (tp_group.py)."""
    art = artifact.open_artifact(path, verify=False)  # rank 0 checked every hash
    entry = art.manifest["tp"]["ranks"][rank]
    gm = _load_program(art, entry["program"], rank)
    programs = _load_variants(art, gm, rank)
    for program in programs:
        program_format.bind_group(program, group_name)
    device = options.get("device", "cpu")  # this rank's (tp_group.rank_device)
    params = _load_params(art, entry["params"], device, entry["weights"])
    g = dict(options["geometry"])
    g["dtype"] = getattr(torch, g["dtype"].removeprefix("torch."))
    memory, page = options["kv_memory"], options["kv_page_size"]
    cache = _make_kv_cache(options["kv_cache"], KVGeometry(**g), device, memory, page)
    return ModelRunner(programs, params, device, cache), cache


def _load_variants(art: artifact.Artifact, base, rank: int) -> StepPrograms:
    """Rank `rank`'s program per step size: the base program, plus the overlap variants of a
    --overlap auto artifact, each taking the same parameters."""
    entry = art.manifest.get("overlap") or {}
    variants = {}
    count = _num_placeholders(base)
    for name, v in (entry.get("variants") or {}).items():
        try:
            file = v["ranks"][rank]
        except (KeyError, IndexError, TypeError):
            raise ArtifactError(
                f"{art.path}: manifest.json lists no rank {rank} program of variant {name!r}; "
                "recompile the model"
            ) from None
        variants[name] = _load_program(art, file, rank)
        if _num_placeholders(variants[name]) != count:
            raise ArtifactError(
                f"{art.path}: {file} takes other inputs than {artifact.PROGRAM}; recompile"
            )
    try:
        return StepPrograms(base, variants, entry.get("select"))
    except (TypeError, ValueError) as e:
        raise ArtifactError(
            f"{art.path}: the manifest's overlap table is unreadable ({e})"
        ) from None


def _num_placeholders(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "placeholder")


def _model_config(art: artifact.Artifact) -> ModelConfig:
    try:
        return ModelConfig.from_dict(art.manifest["model"]["config"])
    except (KeyError, TypeError, ValueError, XllmError) as e:
        raise ArtifactError(
            f"{art.path}: the manifest's model config is unreadable ({e}); recompile the model"
        ) from None


def _check_config(art: artifact.Artifact, config: ModelConfig, gm, params: dict) -> None:
    """The manifest is not covered by its own hashes: check the model config it states against
    the program and weights it describes (an edited vocab_size would let token ids past the
    embedding through the request checks)."""
    kv = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "kv_cache")
    layers, _, _, _, kv_heads, head_dim = kv.meta["val"].shape  # [L, 2, S, M, Hkv, D]
    embed = params.get("model.embed_tokens.weight")
    if int(kv_heads) != _kv_heads(art, config):
        raise ArtifactError(
            f"{art.path}: manifest.json says {_kv_heads(art, config)} KV heads per rank, but the "
            f"program has {int(kv_heads)}: the manifest was edited; recompile the model"
        )
    facts = {
        "num_layers": int(layers),
        "head_dim": int(head_dim),
        "vocab_size": None if embed is None else embed.shape[0],
        "hidden_size": None if embed is None else embed.shape[1],
    }
    for name, actual in facts.items():
        stated = getattr(config, name)
        if actual is not None and stated != actual:
            raise ArtifactError(
                f"{art.path}: manifest.json says {name}={stated}, but the program and weights "
                f"have {actual}: the manifest was edited; recompile the model"
            )


def read_arena_plans(art: artifact.Artifact, graph_module) -> list:
    """The artifact's arena plans, or [] (logged) when it has none or they do not fit the
    program as loaded (an artifact from before plans were stored, or another torch's names)."""
    if not art.has(arena_plans.FILE):
        return []
    try:
        text = art.file(arena_plans.FILE).read_text()
        return arena_plans.loads(text, graph_module.graph, where=f"{art.path}/{arena_plans.FILE}")
    except ArtifactError as e:
        log.warning("%s: running without the activation arena", e)
        return []


# generation_config.json's keys a request (or `xllm generate`) falls back to when it leaves them
# out, as vLLM does (its do_sample is not read: vLLM does not either)
SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def _sampling_defaults(art: artifact.Artifact) -> dict:
    """The model's own sampling defaults from generation_config.json; a value SamplingParams
    refuses (the file is untrusted) is left out with a warning."""
    if not art.has("generation_config.json"):
        return {}
    try:
        gen = json.loads(art.file("generation_config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    if not isinstance(gen, dict):
        return {}
    out = {}
    for key in SAMPLING_DEFAULT_KEYS:
        if key not in gen:
            continue
        try:
            SamplingParams(**{key: gen[key]})
        except (RequestError, TypeError) as e:
            log.warning("generation_config.json: %s ignored (%s)", key, e)
            continue
        out[key] = gen[key]
    return out


def _eos_token_ids(art: artifact.Artifact, config: ModelConfig) -> tuple[int, ...]:
    """config.json's eos ids plus generation_config.json's (chat models often stop on a second
    token there, such as <|im_end|>)."""
    ids = list(config.eos_token_ids)
    gen = art.file("generation_config.json")
    if art.has("generation_config.json"):  # only files the manifest lists (and hashes)
        try:
            value = json.loads(gen.read_text()).get("eos_token_id")
        except json.JSONDecodeError:
            value = None
        for token in value if isinstance(value, list) else [value]:
            if isinstance(token, int) and token not in ids:
                ids.append(token)
    return tuple(ids)


def _make_kv_cache(
    kind: str | None, g: KVGeometry, device: str, memory: int | float, page_size: int | None
) -> KVCache:
    kind = kind or ("paged" if device == "cpu" else "contiguous")
    if kind == "paged":
        return build_paged_kv_cache(g, device, memory, page_size)
    if kind == "contiguous":
        return ContiguousKVCache(
            g.num_layers, g.num_slots, g.max_len, g.num_kv_heads, g.head_dim, g.dtype, device
        )
    raise ConfigError(f"kv_cache must be 'paged' or 'contiguous', got {kind!r}")


def _load_program(
    art: artifact.Artifact, name: str = artifact.PROGRAM, rank: int = 0
) -> torch.fx.GraphModule:
    """A program, through program_format (no pickle); its tensor constants, if any, from
    safetensors."""
    constants = {}
    constants_file = artifact.rank_file(program_format.CONSTANTS_FILE, rank)
    if art.has(constants_file):
        constants = _read_safetensors(art, constants_file, None, "cpu")
    return program_format.load(art.file(name), constants)


def _load_params(
    art: artifact.Artifact, names: list[str], device: str, file: str = artifact.WEIGHTS
) -> list[torch.Tensor]:
    if device != "cpu":
        tensors = _read_safetensors(art, file, names, device)
        return [tensors[name] for name in names]
    return _read_into_block(art, file, names)


def _read_into_block(art: artifact.Artifact, file: str, names: list[str]) -> list[torch.Tensor]:
    """The CPU weights read one at a time into one huge-page block (runtime/host_memory.py):
    memory peaks at the block plus one tensor."""
    from xllm_compile.runtime.host_memory import WeightBlock

    try:
        with safe_open(str(art.file(file)), framework="pt", device="cpu") as f:
            present = set(f.keys())
            missing = [n for n in names if n not in present]
            if missing:
                raise ArtifactError(f"{art.path}: {file} lacks {missing[0]!r}; recompile the model")
            sizes = []
            for name in names:
                part = f.get_slice(name)
                numel = 1
                for d in part.get_shape():
                    numel *= d
                sizes.append(numel * DTYPE_BYTES.get(part.get_dtype(), 8))
            block = WeightBlock(sizes)
            return [block.put(i, f.get_tensor(name)) for i, name in enumerate(names)]
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{art.path}: {file} unreadable ({e}); recompile") from None


# safetensors dtype names -> bytes per element (a slot too large is harmless)
DTYPE_BYTES = {
    **dict.fromkeys(("F64", "I64", "U64"), 8),
    **dict.fromkeys(("F32", "I32", "U32"), 4),
    **dict.fromkeys(("F16", "BF16", "I16", "U16"), 2),
    **dict.fromkeys(("I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"), 1),
}


def _read_safetensors(
    art: artifact.Artifact, file: str, names: list[str] | None, device: str
) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(art.file(file)), framework="pt", device=device) as f:
            present = set(f.keys())
            missing = [n for n in names or () if n not in present]
            if missing:
                raise ArtifactError(f"{art.path}: {file} lacks {missing[0]!r}; recompile the model")
            return {name: f.get_tensor(name) for name in (present if names is None else names)}
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{art.path}: {file} unreadable ({e}); recompile") from None
