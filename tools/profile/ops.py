"""`xllm profile ops ART`: where a step's time goes, op by op (torch.profiler over the runtime's
own steps: the artifact loaded with runtime.load, its graph cache included).

Tables: every op the graph calls (an event directly inside a step: `xllm::` ops and the ATen ops
left between them), grouped by op with calls, time per step, share, achieved GB/s (bytes of the
call's tensor inputs / its time) and GFLOP/s (matmuls and attention) against this machine's
ceilings, and beside each `xllm::` op its unfused equivalent — the reference composition the
fusion replaced (tools/profile/kernel.py), timed on inputs of the shapes the step passed; the
same time by layer (a layer starts at every second norm: input and post-attention norms); and the
kernels underneath (profiler self time, every event). `--trace` writes the Chrome/Perfetto trace
of the profiled steps, `--html` a self-contained report (report.py).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from xllm_compile.errors import ConfigError
from xllm_compile.tools.profile import ceilings, steps
from xllm_compile.tools.profile.table import Table

STEP = "xllm.step"  # the record_function around each profiled step
NORMS = ("xllm::rms_norm", "xllm::fused_add_rms_norm", "xllm::all_reduce_add_rms_norm")
_DTYPE_BYTES = {"float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2, "long int": 8,
                "int": 4, "unsigned char": 1, "signed char": 1, "bool": 1}  # fmt: skip


# ops that read only part of an input (rows of a table, a sequence's KV): no bandwidth figure
PARTIAL_READS = frozenset({"aten::embedding", "aten::index", "aten::index_select",
                           "xllm::attention", "xllm::store_kv"})  # fmt: skip
# views move no bytes
VIEWS = frozenset({"aten::view", "aten::reshape", "aten::slice", "aten::select", "aten::unsqueeze",
                   "aten::squeeze", "aten::as_strided", "aten::expand", "aten::permute",
                   "aten::transpose", "aten::t", "aten::alias", "aten::_unsafe_view"})  # fmt: skip
NO_BANDWIDTH = PARTIAL_READS | VIEWS
# the fused ops and the reference composition each replaced (kernel.KERNELS)
FUSED = ("rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding")


def _bytes(event) -> int:
    total = 0
    for shape, dtype in zip(event.input_shapes or [], event.input_dtypes or [], strict=False):
        if shape and dtype in _DTYPE_BYTES:
            n = 1
            for d in shape:
                n *= d
            total += n * _DTYPE_BYTES[dtype]
    return total


def _flops(name: str, shapes: list) -> float | None:
    """Matmul-like ops: 2 * rows * out * in; attention: 4 * T * H * D * (kv length) (bound)."""
    try:
        if name in ("xllm::linear", "aten::linear", "xllm::linear_q", "aten::mm", "aten::addmm"):
            x, w = shapes[0], shapes[1]
            if name == "aten::addmm":
                x, w = shapes[1], shapes[2]
                return 2.0 * x[0] * x[1] * w[1]
            if name == "aten::mm":
                return 2.0 * x[0] * x[1] * w[1]
            rows = 1
            for d in x[:-1]:
                rows *= d
            k = x[-1]
            return 2.0 * rows * w[0] * k
        if name == "xllm::attention":
            q, kv = shapes[0], shapes[1]
            return 4.0 * q[0] * q[1] * q[2] * kv[3]
    except (IndexError, TypeError):
        return None
    return None


def _step_of(event):
    """The step annotation an op runs directly under (through wrappers without "::" in their
    name, such as a TorchScript graph's `forward`), or None for an op called by another op."""
    p = event.cpu_parent
    while p is not None and not p.name.startswith(STEP):
        if "::" in p.name:
            return None
        p = p.cpu_parent
    return p


def _top_level(events) -> list:
    """The ops called directly inside a step annotation, in time order, with their step."""
    out = [(e, s) for e in events if "::" in e.name and (s := _step_of(e)) is not None]
    return sorted(out, key=lambda es: es[0].time_range.start)


def _layers(top: list) -> list[str]:
    """A layer label per top-level op: layer i from its input norm to the next layer's."""
    labels, norms, step = [], 0, None
    for e, s in top:
        if s is not step:
            step, norms = s, 0
        if e.name in NORMS:
            norms += 1
        layer = (norms - 1) // 2
        labels.append("embed" if norms == 0 else f"layer {layer}")
    return labels


def _final_layer(labels: list[str], num_layers: int) -> list[str]:
    final = f"layer {num_layers}"
    return ["final norm + lm_head" if x == final else x for x in labels]


def profile_ops(
    artifact: str | Path,
    phase: str = "decode",
    batch: int = 1,
    tokens: int = 128,
    steps_: int = 5,
    trace: str | Path | None = None,
    html: str | Path | None = None,
    unfused: bool = True,
    graph_cache: str | bool = "auto",
) -> dict[str, Any]:
    """Returns {"ops": [...], "layers": [...], "kernels": [...], "tables": [Table...],
    "step_ms": Timing, "ceiling": {...}, "events": top-level events as dicts}."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from xllm_compile.runtime import load

    if phase not in ("decode", "prefill"):
        raise ConfigError(f"--phase {phase!r}: decode or prefill")
    if batch < 1 or tokens < 1 or steps_ < 1:
        raise ConfigError("--batch, --tokens and --steps must be at least 1")
    engine = load(artifact, max_num_seqs=max(batch, 1), graph_cache=graph_cache)
    config = engine.manifest["model"]["config"]
    if phase == "decode" and batch > engine.scheduler.max_num_seqs:
        raise ConfigError(f"--batch {batch}: the artifact holds {engine.scheduler.max_num_seqs}")
    ceiling = ceilings.measure(str(engine.runner.device))
    seqs_wall: list[float] = []
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available() and engine.runner.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)

    with torch.inference_mode():
        if phase == "decode":
            state = _decode_state(engine, batch, steps_)
            run = state.step
        else:

            def run():
                return steps.prefill_seconds(engine, tokens, 1)

            run()  # warm-up (first calls build buckets and kernels)
        with profile(activities=activities, record_shapes=True) as prof:
            for i in range(steps_):
                with record_function(f"{STEP} {i}"):
                    seqs_wall.append(_wall(run))
        if phase == "decode":
            state.free()
    engine.close()
    events = prof.events()
    top_steps = _top_level(events)
    labels = _final_layer(_layers(top_steps), config["num_layers"])
    top = [e for e, _ in top_steps]
    step_ms = steps.Timing.of(seqs_wall)
    ops = _by_op(top, steps_, ceiling, unfused)
    layers = _by_layer(top, labels, steps_)
    kernels = _kernels(events, steps_)
    if trace:
        Path(trace).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    what = f"{phase} batch {batch}" if phase == "decode" else f"prefill {tokens} tokens"
    tables = _tables(ops, layers, kernels, step_ms, ceiling, what, steps_)
    timeline = [
        {
            "name": e.name,
            "layer": lab,
            "start_us": e.time_range.start,
            "us": e.cpu_time_total,
            "step": s.name,
        }  # fmt: skip
        for (e, s), lab in zip(top_steps, labels, strict=True)
    ]
    result = {
        "what": what,
        "artifact": str(artifact),
        "step_ms": step_ms,
        "ceiling": ceiling,
        "ops": ops,
        "layers": layers,
        "kernels": kernels,
        "tables": tables,
        "timeline": timeline,
    }
    if html:
        from xllm_compile.tools.profile.report import write_html

        write_html(result, Path(html))
    return result


def _wall(fn) -> float:
    import time

    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class _DecodeState:
    def __init__(self, engine, batch: int, steps_: int) -> None:
        self.engine = engine
        self.seqs = steps._sequences(engine, [16] * batch, steps_ + 4, 0)
        self.logits = engine.run_step(self.seqs)
        for _ in range(2):  # warm-up: the bucket is built on its first step
            self.step()

    def step(self) -> None:
        for seq, token in zip(self.seqs, self.logits.argmax(-1).tolist(), strict=True):
            seq.output_ids.append(token)
        self.logits = self.engine.run_step(self.seqs)

    def free(self) -> None:
        steps._free(self.engine, self.seqs)


def _decode_state(engine, batch: int, steps_: int) -> _DecodeState:
    return _DecodeState(engine, batch, steps_)


def _by_op(top: list, n_steps: int, ceiling: dict, unfused: bool) -> list[dict]:
    groups: dict[str, list] = defaultdict(list)
    for e in top:
        groups[e.name].append(e)
    total = sum(e.cpu_time_total for e in top) or 1.0
    rows = []
    for name, evs in groups.items():
        us = sum(e.cpu_time_total for e in evs)
        moved = sum(_bytes(e) for e in evs)
        flops = [_flops(name, e.input_shapes) for e in evs]
        flops_total = sum(f for f in flops if f) if any(flops) else None
        row = {
            "op": name,
            "calls_per_step": len(evs) / n_steps,
            "us_per_step": us / n_steps,
            "share": us / total,
            "gb_s": moved / us / 1e3 if us and moved and name not in NO_BANDWIDTH else None,
            "gflop_s": flops_total / us / 1e3 if flops_total and us else None,
            "unfused_us_per_step": None,
        }
        row["of_copy_bw"] = row["gb_s"] / ceiling["copy_gb_s"] if row["gb_s"] else None
        if unfused and name.startswith("xllm::"):
            row["unfused_us_per_step"] = _unfused_us(name, evs, n_steps)
        rows.append(row)
    return sorted(rows, key=lambda r: -r["us_per_step"])


def _unfused_us(name: str, evs: list, n_steps: int) -> float | None:
    """The reference composition of `name`, timed on inputs of each distinct call shape, summed
    over the step's calls (None where no reference is wired: attention, store_kv, linear_q)."""
    from xllm_compile.tools.bench.bench_kernels import _us
    from xllm_compile.tools.profile.kernel import KERNELS

    op = name.removeprefix("xllm::")
    if op not in FUSED:
        return None
    spec = KERNELS[op]
    by_shape: dict[tuple, int] = defaultdict(int)
    dtypes = {}
    for e in evs:
        key = tuple(tuple(s) for s in e.input_shapes)
        by_shape[key] += 1
        dtypes[key] = e.input_dtypes
    g = torch.Generator().manual_seed(0)
    total = 0.0
    for key, count in by_shape.items():
        args = _inputs_like(op, key, dtypes[key], g)
        if args is None:
            return None
        total += count * _us(lambda a=args: spec.ref(*a), 0.02, 3)
    return total / n_steps


def _dtype(name: str) -> torch.dtype:
    return {"float": torch.float32, "c10::BFloat16": torch.bfloat16, "c10::Half": torch.float16,
            "double": torch.float64}.get(name, torch.float32)  # fmt: skip


def _inputs_like(op: str, shapes: tuple, dtypes: list, g) -> tuple | None:
    """Random inputs of the recorded shapes (the reference's argument order)."""
    t = [
        torch.randn(*s, generator=g).to(_dtype(d)) if s else None
        for s, d in zip(shapes, dtypes, strict=False)
    ]
    try:
        if op == "rms_norm":
            return t[0], t[1], 1e-6
        if op == "fused_add_rms_norm":
            return t[0], t[1], t[2], 1e-6
        if op == "silu_and_mul":  # gate and up: two views of the same width
            return t[0], torch.randn(t[0].shape, generator=g).to(t[0].dtype)
        if op == "rotary_embedding":
            return t[0], t[1], t[2], t[3]
    except (IndexError, TypeError):
        return None
    return None


def _by_layer(top: list, labels: list[str], n_steps: int) -> list[dict]:
    us: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    order: list[str] = []
    for e, lab in zip(top, labels, strict=True):
        if lab not in us:
            order.append(lab)
        us[lab] += e.cpu_time_total
        calls[lab] += 1
    total = sum(us.values()) or 1.0
    return [
        {
            "layer": lab,
            "ops_per_step": calls[lab] / n_steps,
            "us_per_step": us[lab] / n_steps,
            "share": us[lab] / total,
        }  # fmt: skip
        for lab in order
    ]


def _kernels(events, n_steps: int, limit: int = 25) -> list[dict]:
    """Self time of every event under the steps (what actually ran), by name."""
    self_us: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for e in events:
        if e.name.startswith(STEP):
            continue
        self_us[e.name] += e.self_cpu_time_total
        count[e.name] += 1
    total = sum(self_us.values()) or 1.0
    rows = [
        {
            "kernel": k,
            "calls_per_step": count[k] / n_steps,
            "self_us_per_step": v / n_steps,
            "share": v / total,
        }  # fmt: skip
        for k, v in self_us.items()
    ]
    return sorted(rows, key=lambda r: -r["self_us_per_step"])[:limit]


def _tables(ops, layers, kernels, step_ms, ceiling, what, n_steps) -> list[Table]:
    t1 = Table(
        f"ops: {what}, {n_steps} steps (the graph's calls, time per step)",
        ["op", "calls", "us/step", "share", "GB/s", "of copy", "GFLOP/s", "unfused us"],
    )
    for r in ops:
        t1.add(r["op"], r["calls_per_step"], r["us_per_step"], r["share"], r["gb_s"],
               r["of_copy_bw"], r["gflop_s"], r["unfused_us_per_step"])  # fmt: skip
    in_ops = sum(r["us_per_step"] for r in ops) / 1000
    t1.notes.append(
        f"step wall {step_ms} ms (median ± half IQR); {in_ops:.3f} ms of it inside the ops. "
        f"Ceilings ({ceiling['threads']} threads): copy {ceiling['copy_gb_s']:.1f} GB/s, matmul "
        f"{ceiling['matmul_float32_gflop_s']:.0f} GFLOP/s fp32, "
        f"{ceiling['matmul_bfloat16_gflop_s']:.0f} bf16. GB/s: tensor inputs' bytes / time. "
        "unfused us: the reference composition a fusion replaced, timed alone on inputs of the "
        "same shapes (caches warm, no profiler): an op's in-step time also holds the "
        "profiler's ~1-3 us per call, so for ops of a few us compare with `xllm profile kernel`."
    )
    t2 = Table("time by layer", ["layer", "ops", "us/step", "share"])
    for r in layers:
        t2.add(r["layer"], r["ops_per_step"], r["us_per_step"], r["share"])
    t3 = Table(
        "kernels (profiler self time, every event)", ["kernel", "calls", "self us/step", "share"]
    )
    for r in kernels:
        t3.add(r["kernel"], r["calls_per_step"], r["self_us_per_step"], r["share"])
    return [t1, t2, t3]
