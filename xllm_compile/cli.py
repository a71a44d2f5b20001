"""Command line: `xllm-compile MODEL --out ART` and
`xllm {compile,generate,chat,serve,pull,inspect,build-kernels}`.

Each subcommand builds a config and calls one library function. A user error (XllmError) is one
line on stderr and exit status 2; progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from xllm_compile.config import DEVICES, DTYPES, EMIT_FORMATS, CompileConfig
from xllm_compile.errors import ConfigError, XllmError

PROG_COMPILE = "xllm-compile"


def _add_compile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", nargs="?", help="HF model folder (config.json + *.safetensors) or a .gguf file"
    )
    p.add_argument("--out", help="artifact folder to write (required)")
    p.add_argument("--dtype", default=CompileConfig.dtype, choices=list(DTYPES))
    p.add_argument("--device", default=CompileConfig.device, choices=list(DEVICES))
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        dest="max_model_len",
        help="longest sequence (prompt + output); default min(model's, 4096)",
    )
    p.add_argument(
        "--max-num-tokens",
        type=int,
        default=CompileConfig.max_num_tokens,
        dest="max_num_tokens",
        help="most tokens in one step",
    )
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=CompileConfig.max_num_seqs,
        dest="max_num_seqs",
        help="most sequences in one step",
    )
    p.add_argument(
        "--buckets",
        default=None,
        help='graph-cache shape buckets, e.g. "decode=1,2,4,8;prefill=16,64,256;kv=64,256" '
        "(default: powers of two; prefill up to 512 tokens)",
    )
    p.add_argument(
        "--tp",
        type=int,
        default=CompileConfig.tp,
        help="tensor-parallel ranks: one program and weights file each (default 1)",
    )
    p.add_argument(
        "--quant",
        default=CompileConfig.quant,
        metavar="MODE",
        help="weight-only low-bit matmuls over ggml's blocks: keep (a GGUF's own blocks, the "
        "default for a GGUF), q8_0, q4_0, q4_1 (quantized here as llama-quantize does), int8 "
        "(= q8_0), int4 (q4_1 blocks, searched ranges) or none (the default for an HF folder)",
    )
    p.add_argument(
        "--overlap",
        choices=("auto", "none"),
        default=CompileConfig.overlap,
        help="with --tp: compile the compute/communication overlap variants and let the cost "
        "model pick one per step size (auto, the default), or one program for all (none)",
    )
    p.add_argument(
        "--comm-profile",
        default=None,
        metavar="FILE",
        help="with --tp: the all-reduce profile of the target (python -m "
        "xllm_compile.comm_profile --out FILE); default: measured here once and cached",
    )
    p.add_argument(
        "--emit",
        action="append",
        default=[],
        choices=list(EMIT_FORMATS),
        help="also write the optimized program in this format beside it: onnx (model.onnx + "
        "model.onnx.data, the xllm:: ops as an ONNX function domain; needs the onnx package)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--sign", default=None, dest="sign_key", metavar="KEY", help="sign with this ed25519 key"
    )
    _add_pass_args(p)


def _add_pass_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("passes")
    g.add_argument(
        "--passes", default=None, help='comma-separated passes to run (pipeline order), or "none"'
    )
    g.add_argument(
        "--disable-pass",
        action="append",
        default=[],
        dest="disable_passes",
        metavar="NAME",
        help="skip this pass (repeatable)",
    )
    g.add_argument(
        "--dump-graphs",
        default=CompileConfig.dump_graphs,
        dest="dump_graphs",
        metavar="DIR",
        help="write the graph as code after each pass: DIR/NN_<pass>.py",
    )
    g.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=CompileConfig.verify,
        help="check each pass's numbers against the graph before it on sample inputs",
    )
    g.add_argument(
        "--list-passes", action="store_true", dest="list_passes", help="list passes and exit"
    )


def _list_passes() -> str:
    from xllm_compile.passes import PIPELINE
    from xllm_compile.passes.pipeline import OPTIONAL

    width = max(len(p.name) for p in PIPELINE)
    return "\n".join(
        f"{p.name.ljust(width)}  v{p.VERSION}  {p.description}"
        + ("  (optional: --passes +NAME)" if p.name in OPTIONAL else "")
        for p in PIPELINE
    )


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    from xllm_compile.runtime.config import RuntimeConfig  # the flags' defaults

    p.add_argument("--device", default=None, choices=list(DEVICES))
    p.add_argument(
        "--kv-cache",
        default=None,
        choices=["paged", "contiguous"],
        dest="kv_cache",
        help="KV cache kind (default: paged on cpu, contiguous elsewhere)",
    )
    p.add_argument(
        "--kv-memory",
        "--max-memory-utilization",
        type=float,
        default=RuntimeConfig.kv_memory,
        dest="kv_memory",
        help="paged KV budget: bytes, or a fraction of free memory (default 0.5)",
    )
    p.add_argument(
        "--graph-cache",
        default="auto",
        dest="graph_cache",
        choices=["auto", "none", "eager", "cpu_graph", "inductor", "cuda_graph", "torchair"],
        help="run decode steps through the multi-graph cache with this backend (default auto: "
        "cpu_graph, each bucket's step recorded once and replayed without Python, for a "
        "one-rank artifact on the CPU; none elsewhere)",
    )
    p.add_argument(
        "--arena",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="graph cache: run bucket programs over one activation arena laid out at compile "
        "time (default: on with cuda_graph and cpu_graph when the artifact has arena plans)",
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        dest="max_num_batched_tokens",
        help="tokens in one step, decodes and prefill chunks together: a longer prompt is "
        "prefilled in chunks (default and most: the artifact's --max-num-tokens)",
    )
    p.add_argument(
        "--prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=None,
        dest="prefix_caching",
        help="share the KV pages of prompt prefixes already computed (default: on with the "
        "paged KV cache of a one-rank artifact)",
    )
    p.add_argument(
        "--trust",
        default=None,
        metavar="KEYS",
        help="a file of trusted public keys: refuse an artifact not signed by one of them",
    )
    p.add_argument(
        "--tp-timeout",
        type=float,
        default=RuntimeConfig.tp_timeout_s,
        dest="tp_timeout_s",
        help="tensor-parallel artifacts: seconds a step may wait on the other ranks (default 30)",
    )


def _load(args: argparse.Namespace, **extra):
    from xllm_compile.runtime import load
    from xllm_compile.runtime.config import RuntimeConfig
    from xllm_compile.runtime.tp_group import serve_torchrun_rank, torchrun_rank

    if torchrun_rank():  # torchrun's ranks > 0 run rank 0's steps; only rank 0 answers
        serve_torchrun_rank(args.artifact, args.device)  # returns only by exiting the process
    memory = int(args.kv_memory) if args.kv_memory > 1 else args.kv_memory
    config = RuntimeConfig(
        device=args.device,
        kv_cache=args.kv_cache,
        kv_memory=memory,
        graph_cache=False if args.graph_cache == "none" else args.graph_cache,
        arena=args.arena,
        trust=args.trust,
        tp_timeout_s=args.tp_timeout_s,
        max_num_batched_tokens=args.max_num_batched_tokens,
        prefix_caching=args.prefix_caching,
        **extra,
    )
    return load(args.artifact, config)


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="artifact folder written by xllm-compile")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    src.add_argument("--chat", help="a user message, wrapped in the model's chat template")
    src.add_argument("--token-ids", dest="token_ids", help="prompt as comma-separated token ids")
    p.add_argument("--max-tokens", type=int, default=32, dest="max_tokens")
    _add_sampling_args(p)
    p.add_argument("--top-k", type=int, default=None, dest="top_k")
    p.add_argument("--min-p", type=float, default=None, dest="min_p")
    p.add_argument(
        "--repetition-penalty", type=float, default=None, dest="repetition_penalty", help="1: off"
    )
    p.add_argument("--presence-penalty", type=float, default=0.0, dest="presence_penalty")
    p.add_argument("--frequency-penalty", type=float, default=0.0, dest="frequency_penalty")
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        dest="ignore_eos",
        help="generate --max-tokens tokens whatever the model says (benchmarks)",
    )
    _add_runtime_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    what = "default: the model's generation_config.json, else"
    p.add_argument("--temperature", type=float, default=None, help=f"{what} 0 (greedy)")
    p.add_argument("--top-p", type=float, default=None, dest="top_p", help=f"{what} 1")
    p.add_argument("--seed", type=int, default=None)


def _sampling_kwargs(args: argparse.Namespace, *names: str) -> dict:
    """The sampling flags the user gave: the engine fills the rest from generation_config.json
    (as `xllm serve` does for a request), then SamplingParams' defaults."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def cmd_compile(args: argparse.Namespace) -> int:
    from xllm_compile.compiler import compile_model
    from xllm_compile.passes import parse_pass_list

    if args.list_passes:
        print(_list_passes())
        return 0
    if args.model is None or args.out is None:
        raise ConfigError("MODEL and --out are required (or pass --list-passes)")
    cfg = CompileConfig(
        model_path=args.model,
        out_dir=args.out,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        max_num_tokens=args.max_num_tokens,
        max_num_seqs=args.max_num_seqs,
        buckets=args.buckets,
        show_progress=not args.quiet,
        passes=parse_pass_list(args.passes),
        disable_passes=tuple(args.disable_passes),
        dump_graphs=args.dump_graphs,
        verify=args.verify,
        sign_key=args.sign_key,
        tp=args.tp,
        overlap=args.overlap,
        comm_profile=args.comm_profile,
        quant=args.quant,
        emit=tuple(dict.fromkeys(args.emit)),
    )
    out = compile_model(cfg)
    print(f"compiled {args.model} -> {out}")
    return 0


def _parse_token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise XllmError(f"--token-ids {text!r}: expected comma-separated integers") from None


def cmd_generate(args: argparse.Namespace) -> int:

    engine = _load(args)
    if args.token_ids is not None:
        prompts = [_parse_token_ids(args.token_ids)]
    elif args.chat is not None:
        if engine.tokenizer is None:
            raise XllmError("--chat needs a tokenizer, and this artifact has none")
        prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": args.chat}])]
    else:
        prompts = args.prompt
    sampling = _sampling_kwargs(
        args,
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
    )
    if len(prompts) == 1 and not args.json and args.token_ids is None and engine.tokenizer:
        # one text prompt: its text as it is generated (a failure after some text is still
        # one line on stderr and exit status 2)
        for piece in engine.stream(
            prompts[0], max_tokens=args.max_tokens, ignore_eos=args.ignore_eos, **sampling
        ):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    results = engine.generate(
        prompts, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos, **sampling
    )
    for r in results:
        if args.json:
            print(
                json.dumps(
                    {
                        "text": r.text,
                        "token_ids": r.token_ids,
                        "finish_reason": r.finish_reason,
                        **({"error": r.error} if r.error else {}),
                    }
                )
            )
        elif args.token_ids is not None or r.text is None:
            print(",".join(map(str, r.token_ids)))
        else:
            print(r.text)
    failed = [r.error for r in results if r.finish_reason == "error"]
    if failed:
        raise XllmError(f"generation failed: {failed[0]}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from xllm_compile.tools.inspect_artifact import inspect_artifact

    print(inspect_artifact(args.artifact, as_json=args.json))
    return 0


def _pull_names() -> list[str]:
    from xllm_compile.pull import MODELS

    return list(MODELS)


def cmd_pull(args: argparse.Namespace) -> int:
    from xllm_compile.pull import pull_main

    print(pull_main(args.name, args.dir))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from xllm_compile.chat import chat_loop

    engine = _load(args)
    chat_loop(
        engine,
        system=args.system,
        max_tokens=args.max_tokens,
        **_sampling_kwargs(args, "temperature", "top_p", "seed"),
    )
    return 0


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    # host/port default to None and then to ServerConfig's fields: importing the server here
    # would load torch and fastapi for every subcommand
    p.add_argument("artifact", help="artifact folder written by xllm-compile")
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="default 8000; 0: any free port")
    p.add_argument(
        "--model-name",
        default=None,
        dest="model_name",
        help='the model id clients send as "model" (default: the artifact folder\'s name)',
    )
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=None,
        dest="max_num_seqs",
        help="most sequences in one batch (default: the artifact's limit)",
    )
    p.add_argument("--warmup", action="store_true", help="build every graph bucket before serving")
    p.add_argument(
        "--no-access-log",
        action="store_true",
        dest="no_access_log",
        help="no per-request line on stderr",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=None,
        dest="graceful_shutdown_s",
        help="seconds open requests may run on after SIGTERM/Ctrl-C before each is ended "
        "with a final event (default 5)",
    )
    _add_runtime_args(p)


def cmd_serve(args: argparse.Namespace) -> int:
    from xllm_compile.runtime.server import HTTPServer, ServerConfig, model_name_for

    if not args.no_access_log:  # one line per request on stderr (runtime/server.py AccessLog)
        logging.getLogger("xllm.access").setLevel(logging.INFO)
    engine = _load(args, max_num_seqs=args.max_num_seqs)
    if args.warmup:
        engine.warmup(show_progress=True)
    keys = ("host", "port", "graceful_shutdown_s")
    given = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    name = args.model_name or model_name_for(args.artifact)
    server = HTTPServer(engine, ServerConfig(**given, model_name=name))
    print(f"xllm: serving {name!r} at {server.url}/v1 (Ctrl-C stops)", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on
        pass
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from xllm_compile.signing import generate_key

    pub = generate_key(Path(args.key))
    print(f"private key: {args.key} (keep it secret)\npublic key:  {pub} (give it to --trust)")
    return 0


def cmd_kernels(args: argparse.Namespace) -> int:
    """Which backend implements each xllm:: op on this machine, and why a fallback is taken."""
    import xllm_compile.kernels  # noqa: F401  (registers the ops)
    from xllm_compile.kernels.registry import table

    rows = [r for r in table() if args.backend in (None, r["backend"])]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["op"]) for r in rows)
    for r in rows:
        line = f"{r['op']:<{width}}  {r['backend']:<4}  {r['runs']}"
        if r["fallbacks"]:
            line += "   (" + "; ".join(r["fallbacks"]) + ")"
        print(line)
    return 0


def cmd_build_kernels(args: argparse.Namespace) -> int:
    """Build (or find) the C++ CPU kernels now; prints the shared library's path."""
    from xllm_compile.kernels.cpu.build import KernelBuildError, build_and_load

    try:
        print(build_and_load(timeout_s=args.timeout))
    except KernelBuildError as e:
        raise XllmError(f"the C++ CPU kernels cannot be built: {e}") from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xllm", description="xllm-compile runtime and tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compile", help="compile a model folder into an artifact")
    _add_compile_args(p)
    p.set_defaults(func=cmd_compile)
    p = sub.add_parser("generate", help="generate text from an artifact")
    _add_generate_args(p)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("chat", help="talk to an artifact through its chat template")
    p.add_argument("artifact")
    p.add_argument("--system", default=None, help="a system message")
    p.add_argument("--max-tokens", type=int, default=256, dest="max_tokens")
    _add_sampling_args(p)
    _add_runtime_args(p)
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("serve", help="serve an artifact over OpenAI-compatible HTTP")
    _add_serve_args(p)
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("pull", help="download a known model (GGUF) into the cache")
    p.add_argument("name", choices=sorted(_pull_names()))
    p.add_argument("--dir", default=None, help="cache folder (default: ~/.cache/xllm_compile)")
    p.set_defaults(func=cmd_pull)
    p = sub.add_parser("keygen", help="make an ed25519 key pair for --sign / --trust")
    p.add_argument("key", help="path of the private key to write (KEY.pub: the public key)")
    p.set_defaults(func=cmd_keygen)
    p = sub.add_parser("build-kernels", help="build the C++ CPU kernels now (else on first use)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for a lock")
    p.set_defaults(func=cmd_build_kernels)
    p = sub.add_parser("kernels", help="which kernel implements each op here, and why not others")
    p.add_argument("--backend", choices=["cpu", "cuda", "npu"], default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_kernels)
    p = sub.add_parser("inspect", help="show an artifact's manifest")
    p.add_argument("artifact")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)
    from xllm_compile.tools.profile.cli import add_parser as add_profile

    add_profile(sub)
    return parser


def _run(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return args.func(args)
    except XllmError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `xllm inspect --json | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit flush
        return 0


def main(argv: list[str] | None = None) -> int:
    """`xllm ...`"""
    return _run(build_parser(), argv)


def compile_main(argv: list[str] | None = None) -> int:
    """`xllm-compile MODEL --out ART ...`"""
    parser = argparse.ArgumentParser(
        prog=PROG_COMPILE, description="compile a model into an artifact"
    )
    _add_compile_args(parser)
    parser.set_defaults(func=cmd_compile)
    return _run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
