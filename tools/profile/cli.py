"""The `xllm profile ...` subcommands (wired into xllm_compile/cli.py)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from xllm_compile.errors import ConfigError


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected sizes like 1,8") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive sizes like 1,8")
    return sizes


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="what each pass and kernel buys (for kernel developers)")
    kinds = p.add_subparsers(dest="profile", required=True)

    q = kinds.add_parser("passes", help="each pass: graph delta, compile time, step time saved")
    q.add_argument("model", help="a model folder, a .gguf file or an artifact (its source)")
    q.add_argument("--batch", type=_sizes, default=[1, 8], help="decode batch sizes (1,8)")
    q.add_argument("--tokens", type=_sizes, default=[128], help="prefill token counts (128)")
    q.add_argument("--rounds", type=int, default=3, help="timing rounds over all cuts (3)")
    q.add_argument("--steps", type=int, default=8, help="decode steps timed per round (8)")
    q.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    q.add_argument(
        "--verify",
        action="store_true",
        help="compare each cut's logits with the unoptimized program's; name the first pass "
        "that moves them beyond the dtype's tolerance",
    )
    _common(q)
    q.set_defaults(func=cmd_passes)

    q = kinds.add_parser("ops", help="per-op and per-kernel time of a step (torch.profiler)")
    q.add_argument("artifact")
    q.add_argument("--phase", default="decode", choices=["decode", "prefill"])
    q.add_argument("--batch", type=int, default=1, help="decode sequences (1)")
    q.add_argument("--tokens", type=int, default=128, help="prefill tokens (128)")
    q.add_argument("--steps", type=int, default=5, help="profiled steps (5)")
    q.add_argument("--trace", default=None, help="write the Chrome/Perfetto trace JSON here")
    q.add_argument("--html", default=None, help="write a self-contained HTML report here")
    q.add_argument("--no-unfused", action="store_true", help="skip timing the unfused ops")
    _common(q)
    q.set_defaults(func=cmd_ops)

    q = kinds.add_parser("cache", help="the graph cache's buckets; padding for observed traffic")
    q.add_argument("artifact")
    q.add_argument("--histogram", default=None, help="a file of observed step sizes")
    q.add_argument("--max-buckets", type=int, default=None, help="capture budget: bucket count")
    q.add_argument("--budget", default=None, help="memory budget of the decode buckets (bytes)")
    _common(q)
    q.set_defaults(func=cmd_cache)

    q = kinds.add_parser("kernel", help="one xllm:: kernel against its reference")
    q.add_argument("name", help="rms_norm, fused_add_rms_norm, silu_and_mul, rotary_embedding, "
                   "linear, linear_q")  # fmt: skip
    q.add_argument("--shapes", default=None, help="e.g. 1x576,128x576 (see `--help` of each)")
    q.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    q.add_argument("--device", default="cpu")
    q.add_argument("--qtype", default="q4_1", help="linear_q's block format (q4_1)")
    _common(q)
    q.set_defaults(func=cmd_kernel)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--graph-cache",
        default="auto",
        dest="graph_cache",
        help="the runtime's graph cache: auto (as xllm serve runs), none, eager, cpu_graph, "
        "cuda_graph, inductor",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _jsonable(v: Any) -> Any:
    if hasattr(v, "to_dict"):
        return v.to_dict()
    if hasattr(v, "__dataclass_fields__"):
        return {k: _jsonable(getattr(v, k)) for k in v.__dataclass_fields__}
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    return v


def _emit(args: argparse.Namespace, result: dict, tables: list) -> None:
    if args.json:
        print(json.dumps(_jsonable(result), indent=2))
    else:
        print("\n\n".join(t.render() for t in tables))


def _graph_cache(args: argparse.Namespace) -> str | bool:
    return False if args.graph_cache == "none" else args.graph_cache


def _bytes_arg(text: str) -> int:
    """'64MiB', '2G', '1000000' -> bytes."""
    units = {"k": 1e3, "m": 1e6, "g": 1e9, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
    t = text.strip().lower().removesuffix("b") if not text.lower().endswith("ib") else text.lower()
    for unit in sorted(units, key=len, reverse=True):
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * units[unit])
            except ValueError:
                break
    try:
        return int(float(t))
    except ValueError:
        raise ConfigError(f"--budget {text!r}: expected bytes like 64MiB or 2e6") from None


def cmd_passes(args: argparse.Namespace) -> int:
    from xllm_compile.tools.profile.passes import profile_passes

    if args.rounds < 1 or args.steps < 1:
        raise ConfigError("--rounds and --steps must be at least 1")
    result = profile_passes(
        args.model,
        batches=args.batch,
        tokens=args.tokens,
        rounds=args.rounds,
        decode_steps=args.steps,
        dtype=args.dtype,
        verify=args.verify,
        show_progress=not args.quiet,
        graph_cache=_graph_cache(args),
    )
    _emit(args, result, [result["table"]])
    return 1 if args.verify and result["first_drift"] else 0


def cmd_kernel(args: argparse.Namespace) -> int:
    from xllm_compile.tools.profile.kernel import KERNELS, parse_shapes, profile_kernel

    if args.name not in KERNELS:
        raise ConfigError(f"no kernel {args.name!r}; kernels: {', '.join(KERNELS)}")
    result = profile_kernel(
        args.name, parse_shapes(args.shapes, args.name), args.dtype, args.device, args.qtype
    )
    _emit(args, result, [result["table"]])
    return 0 if all(r["ok"] for r in result["rows"]) else 1


def cmd_ops(args: argparse.Namespace) -> int:
    from xllm_compile.tools.profile.ops import profile_ops

    result = profile_ops(
        args.artifact,
        phase=args.phase,
        batch=args.batch,
        tokens=args.tokens,
        steps_=args.steps,
        trace=args.trace,
        html=args.html,
        unfused=not args.no_unfused,
        graph_cache=_graph_cache(args),
    )
    shown = {k: v for k, v in result.items() if k not in ("tables", "timeline")}
    _emit(args, shown, result["tables"])
    for what, path in (("trace", args.trace), ("report", args.html)):
        if path and not args.json:
            print(f"{what}: {path}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from xllm_compile.tools.profile.cache import profile_cache

    if args.max_buckets is not None and args.max_buckets < 1:
        raise ConfigError("--max-buckets must be at least 1")
    budget = _bytes_arg(args.budget) if args.budget else None
    result = profile_cache(
        args.artifact,
        args.histogram,
        args.max_buckets,
        budget,
        show_progress=not args.quiet,
        graph_cache=_graph_cache(args),
    )
    shown = {k: v for k, v in result.items() if k != "tables"}
    _emit(args, shown, result["tables"])
    return 0
