"""What one all-reduce costs on this machine: measured once with real ranks (N processes, gloo on
loopback, each with its share of the cores as at run time), cached, and read by the cost model
(passes/cost_model.py) that picks each bucket's overlap variant (xllm_compile/overlap.py).

The profile is a table of (bytes, seconds) points, the median of repeated functional
all-reduce + wait_tensor calls, interpolated linearly between points (and extrapolated from the
last two), and `overlap`: the share of an all-reduce that compute running meanwhile hides here
(gloo's thread needs a core: on a machine where every core computes, little is hidden).
`xllm-compile --comm-profile FILE` reads one measured elsewhere (the target machine) instead:
`python -m xllm_compile.comm_profile --size 2 --out FILE` writes it.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from xllm_compile.errors import ConfigError
from xllm_compile.net import free_port

SIZES = tuple(256 * 4**i for i in range(9))  # 256 B .. 16 MiB
TIMEOUT_S = 180.0


@dataclass(frozen=True)
class CommProfile:
    """All-reduce time by message size for `world_size` ranks of `backend`."""

    backend: str
    world_size: int
    points: tuple[tuple[int, float], ...]  # (bytes, seconds), bytes increasing
    source: str = "measured"
    # the share of a collective's time that compute running meanwhile hides (1: all of it)
    overlap: float = 1.0

    def all_reduce_s(self, nbytes: int) -> float:
        xs = [p[0] for p in self.points]
        i = min(max(bisect.bisect_left(xs, nbytes), 1), len(xs) - 1)
        (x0, y0), (x1, y1) = self.points[i - 1], self.points[i]
        return max(y0 + (y1 - y0) * (nbytes - x0) / (x1 - x0), self.points[0][1])

    def to_dict(self) -> dict:
        return {
            "backend": self.backend,
            "world_size": self.world_size,
            "points": [list(p) for p in self.points],
            "source": self.source,
            "overlap": self.overlap,
        }

    @classmethod
    def from_dict(cls, d: dict, source: str) -> CommProfile:
        try:
            points = tuple(sorted((int(b), float(s)) for b, s in d["points"]))
            overlap = min(1.0, max(0.0, float(d.get("overlap", 1.0))))
            profile = cls(str(d["backend"]), int(d["world_size"]), points, source, overlap)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{source}: not a communication profile ({e})") from None
        if len(points) < 2 or any(s < 0 for _, s in points):
            raise ConfigError(f"{source}: a communication profile needs two or more points")
        return profile


def cache_path(world_size: int, backend: str = "gloo") -> Path:
    root = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    host = f"{platform.node()}-{os.cpu_count()}cpu"
    return Path(root) / "xllm_compile" / "comm" / f"{backend}-w{world_size}-{host}-v2.json"


def read(path: str | Path, world_size: int) -> CommProfile:
    """A stored profile (`--comm-profile FILE`), checked to be for `world_size` ranks."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--comm-profile {path}: cannot read it ({e})") from None
    profile = CommProfile.from_dict(doc, str(path))
    if profile.world_size != world_size:
        raise ConfigError(
            f"--comm-profile {path} was measured on {profile.world_size} ranks, not {world_size}"
        )
    return profile


def load_or_measure(world_size: int, refresh: bool = False) -> CommProfile:
    """This machine's profile for `world_size` gloo ranks: from the cache, else measured now
    (a few seconds) and cached."""
    path = cache_path(world_size)
    if path.is_file() and not refresh:
        try:
            return CommProfile.from_dict(json.loads(path.read_text()), f"cached {path}")
        except (ConfigError, OSError, ValueError):
            pass  # measure again
    profile = measure(world_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(profile.to_dict()))
    os.replace(tmp, path)
    return profile


def measure(world_size: int, sizes=SIZES) -> CommProfile:
    """Start `world_size` processes on loopback, time functional all-reduces of each size."""
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "xllm_compile.comm_profile", "--worker"]
            + [json.dumps([rank, world_size, port, threads, list(sizes)])],
            stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for rank in range(world_size)
    ]
    try:
        out, err = procs[0].communicate(timeout=TIMEOUT_S)
        for p in procs[1:]:
            p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the all-reduce measurement took over {TIMEOUT_S:g} s") from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if procs[0].returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"the all-reduce measurement failed: {tail[0]}")
    result = json.loads(out)
    raw = result["points"]
    # never cheaper for more bytes: each point is the least time measured at its size or above
    points = tuple((b, min(t for _, t in raw[i:])) for i, (b, _) in enumerate(raw))
    return CommProfile("gloo", world_size, points, "measured", result["overlap"])


def _worker(rank: int, world_size: int, port: int, threads: int, sizes: list[int]) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    c10d, group = torch.ops._c10d_functional, dist.group.WORLD.group_name
    points = []
    for nbytes in sizes:
        x = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
        reps = 16 if nbytes <= 1 << 20 else 4
        for _ in range(4):  # the first calls set up connections and buffers
            c10d.wait_tensor(c10d.all_reduce(x, "sum", group))
        rounds = []
        for _ in range(5):  # back to back, as a step's all-reduces run: ranks in lockstep
            dist.barrier()
            start = time.perf_counter()
            for _ in range(reps):
                c10d.wait_tensor(c10d.all_reduce(x, "sum", group))
            rounds.append((time.perf_counter() - start) / reps)
        points.append([x.numel() * 4, sorted(rounds)[1]])  # the second best of five
    result = {"points": points, "overlap": _overlap(group, c10d)}
    if rank == 0:
        print(json.dumps(result))
    dist.destroy_process_group()


def _overlap(group: str, c10d) -> float:
    """How much of an all-reduce runs hidden behind compute on this machine: 1 when the
    collective's thread has a core of its own, ~0 when it shares the compute's (gloo on a
    machine with no core to spare). A matmul loop and a 4 MiB all-reduce, alone and together:
    (alone + alone - together) / the shorter one, the median of five tries."""
    import torch
    import torch.distributed as dist

    a, b = torch.randn(256, 256), torch.randn(256, 256)
    x = torch.ones(1 << 20)

    def compute():
        for _ in range(40):
            torch.mm(a, b)

    def timed(fn) -> float:
        dist.barrier()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def both():
        work = c10d.all_reduce(x, "sum", group)
        compute()
        c10d.wait_tensor(work)

    for fn in (compute, both):
        fn()  # warm-up
    tries = []
    for _ in range(5):
        t_compute = timed(compute)
        t_comm = timed(lambda: c10d.wait_tensor(c10d.all_reduce(x, "sum", group)))
        t_both = timed(both)
        tries.append((t_compute + t_comm - t_both) / min(t_compute, t_comm))
    return round(min(1.0, max(0.0, sorted(tries)[2])), 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m xllm_compile.comm_profile",
        description="measure all-reduce time by size on this machine (for --comm-profile)",
    )
    parser.add_argument("--size", type=int, default=2, help="ranks (default 2)")
    parser.add_argument("--out", help="write the profile here (default: the cache)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(*json.loads(args.worker))
        return 0
    profile = measure(args.size) if args.out else load_or_measure(args.size, refresh=True)
    text = json.dumps(profile.to_dict(), indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
