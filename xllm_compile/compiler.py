"""The compile driver behind `xllm-compile`: model folder -> traced, optimized program + weights
-> artifact directory. Imports the model code, tracing and passes; never the runtime."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import shutil
from pathlib import Path

import torch

from xllm_compile import (
    arena_plans,
    artifact,
    env,
    onnx_export,
    overlap,
    program_format,
    signing,
    tp,
)
from xllm_compile.backend import check_device
from xllm_compile.buckets import parse_buckets, step_shapes
from xllm_compile.config import CompileConfig, ModelConfig
from xllm_compile.errors import ConfigError
from xllm_compile.hf import load_hf_config, save_safetensors, stream_weights
from xllm_compile.models import model_config_from_hf, rotary_tables
from xllm_compile.passes import PassContext, PassManager, build_pipeline
from xllm_compile.passes.base import PARAM_KINDS
from xllm_compile.passes.memory_plan import plan_memory
from xllm_compile.progress import progress
from xllm_compile.staging import Staging, clean_stale, sibling, write_error
from xllm_compile.trace import INPUT_NAMES, build_meta_model, export_model, verify_inputs

log = logging.getLogger(__name__)


def resolve_max_len(config: ModelConfig, requested: int | None) -> int:
    if requested is None:
        return min(config.max_position_embeddings, 4096)
    if requested > config.max_position_embeddings:
        log.warning(
            "--max-model-len %d exceeds the model's max_position_embeddings %d",
            requested,
            config.max_position_embeddings,
        )
    return requested


def compile_model(cfg: CompileConfig) -> Path:
    """Compile `cfg.model_path` into `cfg.out_dir`; returns the artifact path.

    The artifact is written to a temporary sibling folder, fsynced and swapped into place in one
    rename (staging.py), so a failed or killed compile never leaves (or destroys) a half-written
    artifact; a write error (ENOSPC...) is an ArtifactError with the old artifact intact.
    """
    check_device(cfg.device)
    pipeline = build_pipeline(cfg.passes, cfg.disable_passes)  # bad names fail before any work
    key = signing.load_key(cfg.sign_key) if cfg.sign_key else None  # so does a bad key
    if "onnx" in cfg.emit:  # and an export that cannot be written
        onnx_export.check_supported(cfg)
    model_dir, out_dir = Path(cfg.model_path), Path(cfg.out_dir)
    _check_out_dir(out_dir)
    if model_dir.suffix == ".gguf":
        return _compile_gguf(cfg, model_dir, out_dir)
    cfg = _resolve_quant(cfg, model_dir)
    if "onnx" in cfg.emit:
        onnx_export.check_quant(cfg.quant)
    hf_config = load_hf_config(model_dir)
    config = model_config_from_hf(hf_config)
    tp.check_tp(config, cfg.tp)
    if cfg.comm_profile:  # a bad profile fails before any work
        from xllm_compile import comm_profile

        comm_profile.read(cfg.comm_profile, cfg.tp)
    max_len = resolve_max_len(config, cfg.max_model_len)
    # a bad --buckets fails before any work
    parse_buckets(cfg.buckets, cfg.max_num_seqs, max_len, cfg.max_num_tokens)
    if cfg.tp > 1:
        ranks = _compile_ranks(model_dir, config, cfg, max_len, pipeline)
    else:
        with progress(total=2, desc="tracing", unit="step", show=cfg.show_progress) as bar:
            ep = export_model(
                config, cfg.torch_dtype, max_len, cfg.max_num_tokens, cfg.max_num_seqs
            )
            bar.update(2)
        expected = {n: t.shape for n, t in ep.state_dict.items()}
        weights = _load_weights(model_dir, expected, config, cfg, max_len)
        blocks = _read_blocks(model_dir, cfg)
        pass_log = optimize(ep, weights, config, cfg, pipeline, blocks)
        ranks = [RankProgram(ep, weights, pass_log)]
    with Staging(out_dir) as tmp_dir:  # the old artifact stays at out_dir until the swap
        _write(tmp_dir, model_dir, ranks, config, hf_config, cfg, max_len)
        if key is not None:
            signing.sign(tmp_dir, key)
    return out_dir


def compile_cuts(cfg: CompileConfig, out_root: Path) -> list[tuple[str, Path, dict | None]]:
    """The pipeline cut after each pass, as artifacts: traced once, then the passes run one at a
    time on one program (one PassContext, as in a full compile) and the program is written
    after each. Returns [(label, artifact path, that pass's log entry)]: ("none", .., None)
    first, then ("+<pass>", .., entry) in pipeline order (a skipped pass too: its cut is the
    one before it). For `xllm profile passes`; one rank, an HF folder (convert a GGUF first).
    """
    check_device(cfg.device)
    pipeline = build_pipeline(cfg.passes, cfg.disable_passes)
    model_dir = Path(cfg.model_path)
    cfg = _resolve_quant(cfg, model_dir)
    if cfg.tp > 1:
        raise ConfigError("profiling the pipeline's cuts takes a one-rank model (no --tp)")
    hf_config = load_hf_config(model_dir)
    config = model_config_from_hf(hf_config)
    max_len = resolve_max_len(config, cfg.max_model_len)
    parse_buckets(cfg.buckets, cfg.max_num_seqs, max_len, cfg.max_num_tokens)
    ep = export_model(config, cfg.torch_dtype, max_len, cfg.max_num_tokens, cfg.max_num_seqs)
    expected = {n: t.shape for n, t in ep.state_dict.items()}
    weights = _load_weights(model_dir, expected, config, cfg, max_len)
    ctx = PassContext(
        ep=ep,
        weights=weights,
        dtype=cfg.torch_dtype,
        device=cfg.device,
        sample_inputs=None,
        config=config,
        quant=cfg.quant,
        blocks=dict(_read_blocks(model_dir, cfg)),
    )
    cuts, pass_log = [], []

    def write(label: str, entry: dict | None) -> None:
        out = out_root / label.lstrip("+")
        with Staging(out) as tmp_dir:
            rank = RankProgram(ep, dict(ctx.weights), list(pass_log))
            _write(tmp_dir, model_dir, [rank], config, hf_config, cfg, max_len)
        cuts.append((label, out, entry))

    write("none", None)
    for p in pipeline:
        [entry] = PassManager([p]).run(ctx)
        pass_log.append(entry)
        write(f"+{p.name}", entry)
    return cuts


@dataclasses.dataclass
class RankProgram:
    """One rank's optimized program, its weights (program names) and its pass log."""

    ep: torch.export.ExportedProgram
    weights: dict
    pass_log: list[dict]
    # --overlap auto: the other variants' programs (same weights) and their pass logs
    variants: dict[str, torch.export.ExportedProgram] = dataclasses.field(default_factory=dict)
    variant_logs: dict[str, list[dict]] = dataclasses.field(default_factory=dict)
    choice: overlap.Choice | None = None  # rank 0's, with --overlap auto


def _compile_ranks(model_dir, config: ModelConfig, cfg: CompileConfig, max_len, pipeline):
    """--tp N: the full checkpoint is read once, then each rank's local model is traced with
    row-parallel all-reduces (tp.apply_tp), given its slice of the weights (tp.shard_weights)
    and optimized like a single-rank program. The passes check numbers on a one-rank gloo
    group (an all-reduce over one rank is the identity: each graph is compared with itself)."""
    full = build_meta_model(config, cfg.torch_dtype, max_len).state_dict()
    weights = _load_weights(model_dir, {n: t.shape for n, t in full.items()}, config, cfg, max_len)
    local = tp.local_config(config, cfg.tp)
    auto = overlap.wanted(cfg, pipeline)
    ranks = []
    with one_rank_group() as group:
        for rank in range(cfg.tp):
            transform = functools.partial(tp.apply_tp, size=cfg.tp, rank=rank)
            ep = export_model(
                local, cfg.torch_dtype, max_len, cfg.max_num_tokens, cfg.max_num_seqs, transform
            )
            program_format.bind_group(ep.graph_module, group)
            shard = tp.shard_weights(weights, config, cfg.tp, rank)
            if not auto:
                pass_log = optimize(ep, shard, local, cfg, pipeline)
                ranks.append(RankProgram(ep, shard, pass_log))
            else:
                ranks.append(_optimize_variants(ep, shard, local, cfg, pipeline))
        if auto:
            _choose_overlap(ranks, local, cfg, max_len)
    for r in ranks:
        for program in (r.ep, *r.variants.values()):
            program_format.bind_group(program.graph_module, tp.GROUP)  # the saved placeholder
    return ranks


def _optimize_variants(ep, shard: dict, local: ModelConfig, cfg: CompileConfig, pipeline):
    """The passes before the communication ones once, then each variant's tail on a copy."""
    head, _ = overlap.split_pipeline(pipeline, "base")
    head_log = optimize(ep, shard, local, cfg, head)
    programs, logs = {}, {}
    for variant in overlap.VARIANTS:
        _, tail = overlap.split_pipeline(pipeline, variant)
        programs[variant] = overlap.fork(ep)
        logs[variant] = head_log + optimize(programs[variant], shard, local, cfg, tail)
    base = programs.pop("base")
    return RankProgram(base, shard, logs.pop("base"), programs, logs)


def _choose_overlap(ranks: list[RankProgram], local: ModelConfig, cfg: CompileConfig, max_len):
    """Predict each variant on rank 0 (the ranks run alike), keep the ones some size uses."""
    from xllm_compile import comm_profile

    try:
        profile = (
            comm_profile.read(cfg.comm_profile, cfg.tp)
            if cfg.comm_profile
            else comm_profile.load_or_measure(cfg.tp)
        )
    except (RuntimeError, OSError) as e:  # an optimization: never worth failing the compile
        log.warning("--overlap auto: no all-reduce profile (%s); one program for all steps", e)
        profile = f"no all-reduce profile: {e}"
    first = ranks[0]
    programs = {"base": first.ep, **first.variants}
    params = [first.weights[n] for n in _param_names(first.ep)]
    choice = overlap.choose(programs, params, local, cfg, max_len, profile)
    for r in ranks:
        r.variants = {v: ep for v, ep in r.variants.items() if v in choice.used}
        r.variant_logs = {v: log_ for v, log_ in r.variant_logs.items() if v in choice.used}
        r.pass_log = r.pass_log + [choice.record()]
    ranks[0].choice = choice


def _param_names(ep) -> list[str]:
    return [s.target for s in ep.graph_signature.input_specs if s.kind in PARAM_KINDS]


@contextlib.contextmanager
def one_rank_group():
    """A gloo process group of this process alone, for running TP programs at compile time;
    yields its name."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ConfigError("--tp compiles run in one process; run xllm-compile without torchrun")
        yield dist.group.WORLD.group_name
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD.group_name
    finally:
        dist.destroy_process_group()


def _resolve_quant(cfg: CompileConfig, model_dir: Path) -> CompileConfig:
    """--quant auto -> keep for a converted GGUF's folder (it holds the blocks), else none;
    keep without blocks, or with --tp, is refused."""
    from xllm_compile.gguf import BLOCKS_FILE

    has_blocks = (model_dir / BLOCKS_FILE).is_file()
    quant = cfg.quant
    if quant == "auto":
        quant = "keep" if has_blocks and cfg.tp == 1 and cfg.device == "cpu" else "none"
    if quant == "keep" and not has_blocks:
        raise ConfigError(
            "--quant keep keeps a GGUF's quantized blocks: give a .gguf file, or choose "
            "--quant q8_0|q4_0|q4_1|int8|int4 to quantize this model"
        )
    if quant != "none" and cfg.tp > 1:
        raise ConfigError(
            f"--quant {quant} with --tp {cfg.tp}: quantized tensor-parallel shards are not "
            "implemented yet; use --quant none (a GGUF is then dequantized)"
        )
    return dataclasses.replace(cfg, quant=quant)


def _read_blocks(model_dir: Path, cfg: CompileConfig) -> dict:
    """--quant keep: the GGUF's quantized matmul weights the converter set aside."""
    if cfg.quant != "keep":
        return {}
    from xllm_compile.gguf import read_blocks

    return read_blocks(model_dir)


def _compile_gguf(cfg: CompileConfig, gguf_path: Path, out_dir: Path) -> Path:
    """A GGUF file is converted into a temporary HF folder (tensor by tensor, sharded), which
    then compiles like any other. Its quantized matmul weights are also set aside as they are
    (gguf.BLOCKS_FILE), for --quant keep (the default) to use without a float round trip."""
    from xllm_compile.gguf import gguf_to_hf_folder

    keep = cfg.quant == "keep" or (cfg.quant == "auto" and cfg.device == "cpu" and cfg.tp == 1)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out_dir)
    tmp = sibling(out_dir, "gguf")  # beside the artifact: the same disk, cleaned if killed
    try:
        hf_dir = gguf_to_hf_folder(
            gguf_path,
            tmp / "hf",
            dtype=cfg.torch_dtype,
            show_progress=cfg.show_progress,
            keep_blocks=keep,
        )
        return compile_model(
            dataclasses.replace(cfg, model_path=str(hf_dir), source_path=str(gguf_path.resolve()))
        )
    except OSError as e:
        raise write_error(out_dir, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / artifact.MANIFEST).is_file():
        raise ConfigError(
            f"--out {out_dir} is a non-empty folder that is not an artifact; choose another path"
        )


def _load_weights(model_dir, expected: dict, config: ModelConfig, cfg: CompileConfig, max_len):
    """The checkpoint's tensors of the shapes `expected` (name -> shape), in the compile dtype,
    plus the computed rotary tables."""
    computed = {f"model.rotary_emb.{k}": v for k, v in rotary_tables(config, max_len).items()}
    expected = {n: shape for n, shape in expected.items() if n not in computed}
    optional = frozenset({"lm_head.weight"} if config.tie_word_embeddings else ())
    weights = stream_weights(
        model_dir, expected, cfg.torch_dtype, optional, show_progress=cfg.show_progress
    )
    weights.update(computed)
    return weights


def optimize(
    ep, weights: dict, config: ModelConfig, cfg: CompileConfig, pipeline, blocks=None
) -> list[dict]:
    """Run the pass pipeline on `ep` in place (merges rewrite `weights` too); returns the log.
    `blocks`: --quant keep's quantized weights by name (PassContext.blocks)."""
    ctx = PassContext(
        ep=ep,
        weights=weights,
        dtype=cfg.torch_dtype,
        device=cfg.device,
        sample_inputs=verify_inputs(config, cfg.torch_dtype) if cfg.verify else None,
        config=config,
        quant=cfg.quant,
        blocks=dict(blocks or {}),
    )
    # A tensor-parallel rank program is checked on a one-rank group, where each all-reduce
    # returns the rank's partial sum: its activations are not the model's, and bf16/fp16
    # rounding differences between kernels grow on them (SmolLM2 --tp 3 bf16: 6% at lower_ops
    # against 5% allowed). The TP=N vs TP=1 parity tests check the real math (fp32, 1e-4).
    scale = 2.0 if cfg.tp > 1 and cfg.torch_dtype != torch.float32 else 1.0
    manager = PassManager(
        pipeline, verify=cfg.verify, dump_dir=cfg.dump_graphs, tolerance_scale=scale
    )
    with progress(total=len(pipeline), desc="passes", unit="pass", show=cfg.show_progress) as bar:
        pass_log = manager.run(ctx)
        bar.update(len(pipeline))
    return pass_log


def memory_plans(ep, weights: dict, config: ModelConfig, cfg: CompileConfig, max_len: int) -> dict:
    """The activation arena of the largest decode bucket (max_num_seqs sequences of one token,
    the KV view at max_model_len) and the largest prefill (max_num_tokens tokens of one
    sequence): planned peak, naive sum, live lower bound and counts (passes/memory_plan.py).
    A phase whose planning fails records the error instead (logged): the artifact still works,
    it only lacks the numbers."""
    params = [weights[s.target] for s in ep.graph_signature.input_specs if s.kind in PARAM_KINDS]
    phases = {
        "decode": (cfg.max_num_seqs, cfg.max_num_seqs, cfg.max_num_seqs),
        "prefill": (cfg.max_num_tokens, 1, 1),
    }
    out = {}
    for phase, (tokens, seqs, logits) in phases.items():
        # meta tensors: the plan reads shapes only; [L, 2, S, M, Hkv, D] KV with a slot per seq
        idx = step_inputs_meta(tokens, seqs, logits)
        kv_shape = (config.num_layers, 2, seqs, max_len, config.num_kv_heads, config.head_dim)
        kv = torch.empty(kv_shape, dtype=cfg.torch_dtype, device="meta")
        shapes = {"num_tokens": tokens, "num_seqs": seqs, "num_logits": logits, "kv_len": max_len}
        try:
            plan = plan_memory(ep.graph_module, [*params, *idx, kv], device=cfg.device)
        except Exception as e:  # an analysis: never worth failing the compile over
            log.warning("memory plan (%s) failed: %s: %s", phase, type(e).__name__, e)
            out[phase] = {"shapes": shapes, "error": f"{type(e).__name__}: {e}"}
            continue
        out[phase] = {"shapes": shapes, **plan.summary()}
    return out


def bucket_plans(ep, weights: dict, config: ModelConfig, cfg: CompileConfig, buckets: dict) -> list:
    """Arena plans for every step shape of the graph cache's buckets (buckets.step_shapes, at
    every kv-length bucket), as arena_plans.StoredPlans: one per distinct set of the sizes a plan
    depends on (its guards), so buckets differing only in kv length or sequence count share one.
    Returns [] (logged) if planning fails: the runtime then allocates as usual.

    `ep` must be the program as the runtime loads it (program_format.loads of the saved file):
    serialization reorders nodes and adds getitems, and a plan is only valid for the node order
    it was made for (arena_plans.graph_fingerprint ties the two)."""
    params = [weights[s.target] for s in ep.graph_signature.input_specs if s.kind in PARAM_KINDS]
    slots, dtype = cfg.max_num_seqs + 1, cfg.torch_dtype  # the graph cache's scratch slot
    plans: list[arena_plans.StoredPlan] = []
    shapes = step_shapes(buckets, cfg.max_num_seqs)
    with progress(
        total=len(shapes), desc="arena plans", unit="shape", show=cfg.show_progress
    ) as bar:
        for tokens, seqs in shapes:
            for kv_len in buckets["kv_len"]:
                args = [*params, *step_inputs_meta(tokens, seqs, seqs)]
                kv = (config.num_layers, 2, slots, kv_len, config.num_kv_heads, config.head_dim)
                args.append(torch.empty(kv, dtype=dtype, device="meta"))
                if arena_plans.find_plan(plans, args) is not None:
                    continue
                try:
                    plan = plan_memory(ep.graph_module, args, device=cfg.device)
                    plans.append(arena_plans.StoredPlan.of(plan))
                except Exception as e:  # an optimization: never worth failing the compile over
                    log.warning("arena plans skipped: %s: %s", type(e).__name__, e)
                    return []
            bar.update(1)
    return plans


def step_inputs_meta(tokens: int, seqs: int, logits: int) -> list[torch.Tensor]:
    """Meta tensors shaped like the program's seven index inputs (trace.INPUT_NAMES)."""
    sizes = (tokens, tokens, tokens, seqs, seqs, seqs, logits)
    return [torch.empty(n, dtype=torch.int64, device="meta") for n in sizes]


def _write(tmp_dir, model_dir, ranks: list[RankProgram], config, hf_config, cfg, max_len):
    """Every file of the artifact into `tmp_dir` (kill checkpoints after each, for tests): per
    rank a program and a weights file (rank 0 under the plain names), then the shared files."""
    files = []
    for rank, r in enumerate(ranks):
        program = artifact.rank_file(artifact.PROGRAM, rank)
        weights_name = artifact.rank_file(artifact.WEIGHTS, rank)
        (tmp_dir / program).write_bytes(program_format.dumps(r.ep))
        constants = program_format.tensor_constants(r.ep)
        if constants:
            constants_name = artifact.rank_file(program_format.CONSTANTS_FILE, rank)
            save_safetensors(constants, tmp_dir / constants_name)
        env.kill_at("program")
        params = [s.target for s in r.ep.graph_signature.input_specs if s.target in r.weights]
        save_safetensors({n: r.weights[n].contiguous() for n in params}, tmp_dir / weights_name)
        env.kill_at("weights")
        files.append({"program": program, "weights": weights_name, "params": params})
        for variant, ep_v in r.variants.items():
            (tmp_dir / overlap.variant_file(variant, rank)).write_bytes(program_format.dumps(ep_v))
    tokenizer_files = artifact.copy_tokenizer(model_dir, tmp_dir)
    env.kill_at("tokenizer")
    buckets = parse_buckets(cfg.buckets, cfg.max_num_seqs, max_len, cfg.max_num_tokens)
    ep, weights, plans = ranks[0].ep, ranks[0].weights, []
    if cfg.tp == 1:  # arena plans do not yet cover programs with collectives
        # what the runtime will run: serialization reorders nodes and plans follow node order
        saved = program_format.loads((tmp_dir / artifact.PROGRAM).read_bytes(), constants)
        plans = bucket_plans(saved, weights, config, cfg, buckets)
    if plans:
        (tmp_dir / arena_plans.FILE).write_text(arena_plans.dumps(plans, saved.graph_module.graph))
    env.kill_at("arena_plans")
    onnx_entry = None
    if "onnx" in cfg.emit:  # from the program as the runtime reads it back
        with progress(total=1, desc="onnx", unit="model", show=cfg.show_progress) as bar:
            onnx_entry = onnx_export.export(saved, weights, tmp_dir)
            bar.update(1)
        env.kill_at("onnx")
    artifact.write_manifest(
        tmp_dir,
        {
            "model": {
                "family": config.family,
                "architecture": config.architecture,
                "config": config.to_dict(),
                "hf_config": hf_config,
                "num_parameters": _num_parameters(config, ranks),
            },
            "dtype": cfg.dtype,
            "device": cfg.device,
            "source": {
                "path": cfg.source_path or str(Path(model_dir).resolve()),
                "quant": cfg.quant,
            },
            "limits": {
                "max_model_len": max_len,
                "max_num_tokens": cfg.max_num_tokens,
                "max_num_seqs": cfg.max_num_seqs,
            },
            "program": {"file": artifact.PROGRAM, "inputs": list(INPUT_NAMES), **files[0]},
            "tp": _tp_entry(config, cfg.tp, files) if cfg.tp > 1 else None,
            "overlap": _overlap_entry(ranks) if ranks[0].choice is not None else None,
            "quant": _quant_entry(cfg.quant),
            "tokenizer": {"files": tokenizer_files}
            if "tokenizer.json" in tokenizer_files
            else None,
            "passes": ranks[0].pass_log,
            "memory_plan": memory_plans(ep, weights, config, cfg, max_len) if cfg.tp == 1 else None,
            "buckets": buckets,
            "arena_plans": {"file": arena_plans.FILE, "plans": len(plans)} if plans else None,
            "onnx": onnx_entry,
        },
    )
    env.kill_at("manifest")


def _quant_entry(mode: str) -> dict | None:
    """How the artifact's quantized matmul weights are stored (passes/quantize.py)."""
    if mode == "none":
        return None
    from xllm_compile.passes.quantize import formats_doc

    return {
        "mode": mode,
        "format": "<weight>.<qtype> uint8 [N, row_bytes], run by xllm::linear_q "
        "(kernels/linear_q.py documents the layouts): q4_k/q6_k rows are ggml's blocks in order "
        "along K; q8_0/q4_0/q4_1 rows hold the same bytes regrouped: the nb block scales d "
        "(fp16), the nb mins m (q4_1), then the values in groups of 16 blocks (byte 64c + 4i + k "
        "of a group = byte 4c + k of its block i; c < 8 for q8_0, c < 4 for the 4-bit ones), "
        "the last nb % 16 blocks in block order",
        "qtypes": formats_doc(),
    }


def _overlap_entry(ranks: list[RankProgram]) -> dict:
    """The cost model's table and predictions, and each kept variant's per-rank programs."""
    entry = ranks[0].choice.manifest()
    entry["variants"] = {
        v: {
            "ranks": [overlap.variant_file(v, rank) for rank in range(len(ranks))],
            "passes": ranks[0].variant_logs[v],
        }
        for v in ranks[0].variants
    }
    return entry


def _tp_entry(config: ModelConfig, size: int, files: list[dict]) -> dict:
    local = tp.local_config(config, size)
    shares = ("num_heads", "num_kv_heads", "intermediate_size")
    head = (
        "vocab-parallel (each rank its vocabulary rows; logits all-reduced into [N, V])"
        if tp.vocab_parallel(config, size)
        else f"replicated (--tp {size} does not divide the vocabulary of {config.vocab_size})"
    )
    local_sizes = {k: getattr(local, k) for k in shares}
    return {"size": size, "local": local_sizes, "lm_head": head, "ranks": files}


def _num_parameters(config: ModelConfig, ranks: list[RankProgram]) -> int:
    """The full model's parameter count (rank 0's, plus the other ranks' slices of the
    sharded ones; the rotary tables are not parameters)."""

    def counted(name: str) -> bool:  # a tied model's head slices copy the embedding
        return "rotary" not in name and not (
            config.tie_word_embeddings and name == "lm_head.weight"
        )

    first = ranks[0].weights
    total = sum(w.numel() for n, w in first.items() if counted(n))
    for r in ranks[1:]:
        total += sum(
            w.numel() for n, w in r.weights.items() if counted(n) and w is not first.get(n)
        )
    return total
