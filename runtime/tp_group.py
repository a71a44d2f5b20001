"""Tensor-parallel execution: this process is rank 0 (it schedules, samples and serves); ranks
1..N-1 are worker processes it starts (`python -m xllm_compile.runtime.tp_group`, gloo over a
loopback rendezvous on a free port) and stops on close, at exit, or when it dies (a worker's
pending collective fails the moment rank 0's sockets close; on Linux the kernel also kills
workers whose parent died, PR_SET_PDEATHSIG). Not torch.multiprocessing's spawn: it re-imports
the parent's __main__, which fails under `python -c` or stdin and re-runs unguarded scripts.

Each step rank 0 broadcasts one header [9] and one flat int64 body: the KV-cache journal (the
allocate / grow / free calls rank 0's scheduler made since the last step, replayed by every
worker on its own page-mapped cache, so slots and pages stay identical) and the program's
seven index inputs. Every rank then runs its own program; the all-reduces inside keep the
hidden states equal, and rank 0's logits are the model's.

Backends: the step broadcast is always CPU tensors over gloo; the program's collectives run on
the ranks' device tensors, so a CUDA group is "cpu:gloo,cuda:nccl" (one group, dispatching by
tensor device, as vLLM keeps a CPU group beside its NCCL one) and an Ascend group
"cpu:gloo,npu:hccl" (torch_npu imported first). Rank r of a device group runs on device
<type>:<local rank>. Only the CPU group has run here (no GPU): see the README.

Faults: a worker that dies fails the next collective at once; one that hangs is killed by the
watchdog after `timeout_s`, which fails the step. Either way the group is marked unhealthy
(`/health` says so), every later step raises TPGroupError at once, and requests end with it.
"""

from __future__ import annotations

import atexit
import ctypes
import datetime
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from xllm_compile.errors import BackendUnavailableError, ConfigError, XllmError
from xllm_compile.net import free_port
from xllm_compile.runtime.kv_cache import KVCache

log = logging.getLogger(__name__)

RUN, STOP = 1, 2
HEADER = 10  # command, journal ops, kv length (0: all), then the lengths of the 7 index inputs
ALLOCATE, GROW, FREE = 1, 2, 3
LONG = datetime.timedelta(days=30)  # collectives never time out by themselves: the watchdog does
STARTUP = datetime.timedelta(seconds=120)  # but the ranks must meet within this


class TPGroupError(XllmError):
    """The tensor-parallel group is down (a rank died or hung); restart to serve again."""


class JournaledKVCache(KVCache):
    """Rank 0's KV cache, recording each allocate / grow / free for the workers to replay."""

    def __init__(self, inner: KVCache) -> None:
        self.inner, self.journal = inner, []
        self.tensor = inner.tensor

    def __getattr__(self, name):  # pool, num_free_slots, close, ...
        return getattr(self.inner, name)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.inner.can_allocate(num_tokens)

    def allocate(self, num_tokens: int) -> int:
        slot = self.inner.allocate(num_tokens)
        self.journal.append((ALLOCATE, num_tokens, slot))
        return slot

    def grow(self, slot: int, num_tokens: int) -> bool:
        ok = self.inner.grow(slot, num_tokens)
        self.journal.append((GROW, slot, num_tokens))
        return ok

    def free(self, slot: int) -> None:
        self.inner.free(slot)
        self.journal.append((FREE, slot, 0))

    def take_journal(self) -> list[tuple[int, int, int]]:
        ops, self.journal = self.journal, []
        return ops


def replay(cache: KVCache, ops: list[list[int]]) -> None:
    """A worker's side of the journal: the same calls, in order, on its own cache."""
    for op, a, b in ops:
        if op == ALLOCATE:
            slot = cache.allocate(a)
            if slot != b:
                raise RuntimeError(f"KV slot drift: rank 0 got slot {b}, this rank {slot}")
        elif op == GROW:
            cache.grow(a, b)
        elif op == FREE:
            cache.free(a)


def torchrun_rank() -> int | None:
    """This process's rank when torchrun (or any env:// launcher) started it, else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        return int(os.environ["RANK"])
    return None


GROUP_BACKENDS = {"cpu": "gloo", "cuda": "cpu:gloo,cuda:nccl", "npu": "cpu:gloo,npu:hccl"}


def group_backend(device: str) -> str:
    """The process-group backend for ranks running on `device` (module docstring)."""
    kind = str(device).split(":")[0]  # "npu" is no torch.device before torch_npu is imported
    if kind not in GROUP_BACKENDS:
        raise ConfigError(f"tensor parallel runs on cpu, cuda or npu, not {device}")
    if kind == "npu":
        try:
            import torch_npu  # noqa: F401  (registers the hccl backend)
        except ImportError:
            raise BackendUnavailableError(
                "tensor parallel on npu needs torch_npu (pip install 'xllm-compile[npu]')"
            ) from None
    return GROUP_BACKENDS[kind]


def rank_device(device: str, rank: int) -> str:
    """Where rank `rank` runs: the CPU, or the device of its local rank (torchrun's LOCAL_RANK,
    else the rank: one machine)."""
    kind = str(device).split(":")[0]
    if kind == "cpu":
        return "cpu"
    return f"{kind}:{int(os.environ.get('LOCAL_RANK', rank))}"


def _init_group(device: str = "cpu", **kw) -> None:
    """Join the group: the ranks must meet within STARTUP; after that no collective times out
    by itself (an idle worker waits for rank 0's next step as long as it takes)."""
    dist.init_process_group(group_backend(device), timeout=STARTUP, **kw)
    dist.distributed_c10d._set_pg_timeout(LONG)


def _send_json(value) -> None:
    """Broadcast a JSON value from rank 0 (as bytes: no pickling between ranks)."""
    data = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)
    dist.broadcast(torch.tensor([data.numel()], dtype=torch.int64), 0)
    dist.broadcast(data, 0)


def _receive_json():
    size = torch.empty(1, dtype=torch.int64)
    dist.broadcast(size, 0)
    data = torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(data, 0)
    return json.loads(bytes(data.tolist()).decode())


class TPGroup:
    """Rank 0's handle on the group: starts the workers, broadcasts steps, watches them."""

    def __init__(self, art_path: Path, size: int, worker_options: dict, timeout_s: float):
        self.size, self.timeout_s, self.healthy, self.why = size, timeout_s, True, ""
        self.procs: list[subprocess.Popen] = []
        if torchrun_rank() is None:  # start ranks 1..N-1 here
            port = free_port()
            self.procs = [
                subprocess.Popen(
                    [sys.executable, "-m", "xllm_compile.runtime.tp_group"]
                    + [json.dumps([rank, size, port, str(art_path), worker_options])],
                    preexec_fn=_die_with_parent,
                )
                for rank in range(1, size)
            ]
            try:
                _init_group(
                    worker_options["device"],
                    init_method=f"tcp://127.0.0.1:{port}",
                    rank=0,
                    world_size=size,
                )
            except RuntimeError as e:  # a worker never arrived (it died while starting)
                codes = [p.poll() for p in self.procs]
                self.fail(f"the tensor-parallel ranks did not start (exit codes {codes}: {e})")
                raise TPGroupError(self.why) from None
        else:  # torchrun started every rank: join its group (env://) and tell the others
            _init_group(worker_options["device"])
            if dist.get_world_size() != size:
                world = dist.get_world_size()
                dist.destroy_process_group()
                raise ConfigError(
                    f"{art_path} is a --tp {size} artifact, and torchrun started {world} "
                    f"processes; use --nnodes x --nproc-per-node = {size}"
                )
            _send_json(worker_options)
        self.group_name = dist.group.WORLD.group_name
        self._closed = False
        atexit.register(self.close)

    def step(self, inputs, sizes: list[int], kv_len: int, journal: list) -> None:
        """Send one step to the workers before rank 0 runs its own program: `inputs`, the seven
        index inputs flat (a list, or the graph cache's padded tensor), their `sizes`, the kv
        length of a graph-cache bucket (0: the whole cache) and the KV journal."""
        self.check()
        ops = torch.tensor([x for op in journal for x in op], dtype=torch.int64)
        body = torch.cat([ops, torch.as_tensor(inputs, dtype=torch.int64)])
        header = torch.tensor([RUN, len(journal), kv_len, *sizes], dtype=torch.int64)
        dist.broadcast(header, 0)
        dist.broadcast(body, 0)

    def watch(self) -> _Watchdog:
        """Bound one step: past `timeout_s` the workers are stopped, which fails the step."""
        return _Watchdog(self)

    def check(self) -> None:
        if not self.healthy:
            raise TPGroupError(self.why)
        dead = [(r, p) for r, p in enumerate(self.procs, 1) if p.poll() is not None]
        if dead:
            rank, proc = dead[0]
            self.fail(f"tensor-parallel rank {rank} exited (code {proc.returncode})")
            raise TPGroupError(self.why)

    def fail(self, why: str) -> None:
        if self.healthy:
            log.error("%s; the tensor-parallel group is down", why)
        self.healthy, self.why = False, f"{why}; the tensor-parallel group is down, restart it"
        for p in self.procs:
            if p.poll() is None:
                p.kill()  # rank 0's pending collective fails as their sockets close
        if not self.procs and dist.is_initialized():  # torchrun: the ranks are not ours to kill
            try:
                dist.group.WORLD._get_backend(torch.device("cpu")).abort()
            except (RuntimeError, AttributeError) as e:
                log.warning("could not abort the process group: %s", e)

    def close(self) -> None:
        """Stop the workers (politely when the group is healthy) and leave the group."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        if self.healthy and all(p.poll() is None for p in self.procs):
            try:
                dist.broadcast(torch.tensor([STOP] + [0] * (HEADER - 1)), 0)
            except RuntimeError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if dist.is_initialized():
            dist.destroy_process_group()


class _Watchdog:
    def __init__(self, group: TPGroup) -> None:
        self.group, self.fired = group, False
        self.timer = threading.Timer(group.timeout_s, self._fire)
        self.timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        self.group.fail(f"a tensor-parallel rank did not answer within {self.group.timeout_s:g} s")

    def __enter__(self) -> _Watchdog:
        self.timer.start()
        return self

    def __exit__(self, kind, value, tb) -> bool:
        self.timer.cancel()
        if kind is None or isinstance(value, TPGroupError):
            return False
        if self.group.healthy and _is_peer_error(value):
            self.group.fail(f"a tensor-parallel rank failed ({str(value)[:120]})")
        if not self.group.healthy:  # the watchdog fired, or a peer went away
            raise TPGroupError(self.group.why) from None
        # an ordinary error of this step (a bad input fails every rank alike, before any
        # collective): the engine fails the sequence that caused it and goes on
        return False


def _is_peer_error(e: BaseException) -> bool:
    text = str(e)
    return any(s in text for s in ("Connection closed", "Connection reset", "Broken pipe", "gloo"))


# -- the worker side --


def _die_with_parent() -> None:
    """In the worker, before exec: the kernel SIGKILLs it when rank 0 dies (Linux)."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def serve_torchrun_rank(art: str | Path, device: str | None = None) -> None:
    """A rank > 0 that torchrun started (`torchrun ... -m xllm_compile.cli serve ART` runs
    this on every rank but 0): join the group, take rank 0's options, serve its steps.
    `device`: the command's --device (every rank runs the same command), else the artifact's."""
    if device is None:
        from xllm_compile.artifact import read_manifest

        device = read_manifest(Path(art))["device"]
    _init_group(device)
    options = _receive_json()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    options["threads"] = max(1, (os.cpu_count() or 1) // local)
    _serve_rank(dist.get_rank(), str(art), options)


def _worker_main(rank: int, size: int, port: int, art: str, options: dict) -> None:
    """Ranks 1..N-1 started by TPGroup: join rank 0's loopback group, then serve its steps."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle
    _init_group(
        options["device"], init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size
    )
    _serve_rank(rank, art, options)


def _serve_rank(rank: int, art: str, options: dict) -> None:
    """Load this rank's program and weights, then run the steps rank 0 sends until STOP, or
    until rank 0 goes away (its sockets close, failing the broadcast)."""
    from xllm_compile.runtime.loader import load_rank

    torch.set_num_threads(options["threads"])
    device = rank_device(options["device"], rank)
    if device != "cpu":
        getattr(torch, device.split(":")[0]).set_device(device)
    options = {**options, "device": device}
    runner, cache = load_rank(Path(art), rank, dist.group.WORLD.group_name, options)
    try:
        _serve_steps(runner, cache)
    except RuntimeError as e:  # rank 0 went away: nothing left to do
        log.debug("rank %d leaves: %s", rank, e)
    finally:
        os._exit(0)  # no interpreter teardown racing the parent's pipes


def _serve_steps(runner, cache: KVCache) -> None:
    """Run rank 0's steps on this rank's runner: the same program variant (picked by the token
    count) on this rank's weights and KV cache, which the journal keeps in step with rank 0's."""
    header = torch.empty(HEADER, dtype=torch.int64)
    while True:
        dist.broadcast(header, 0)
        command, num_ops, kv_len, *lens = header.tolist()
        if command == STOP:
            return
        body = torch.empty(3 * num_ops + sum(lens), dtype=torch.int64)
        dist.broadcast(body, 0)
        ops = body[: 3 * num_ops].tolist()
        replay(cache, [ops[i : i + 3] for i in range(0, 3 * num_ops, 3)])
        inputs = [t.to(runner.device) for t in body[3 * num_ops :].split(lens)]
        kv = cache.tensor if kv_len == 0 else cache.tensor[:, :, :, :kv_len]  # a bucket's view
        try:
            with torch.inference_mode():
                runner.run_inputs(inputs, kv)
        except Exception as e:  # the same inputs fail rank 0 too, before any collective
            log.warning("a step failed on this rank: %s: %s", type(e).__name__, e)


if __name__ == "__main__":  # a worker rank, started by TPGroup
    _worker_main(*json.loads(sys.argv[1]))
