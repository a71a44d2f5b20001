"""A compile never loses data: killed at any checkpoint, or out of disk space, a compile over an
existing artifact leaves a loadable artifact at the path (the old one until the swap, the new one
after), and the next compile clears what the killed one left beside it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from xllm_compile.artifact import MANIFEST, open_artifact
from xllm_compile.runtime import load
from xllm_compile.staging import clean_stale

from conftest import compile_cli

CHECKPOINTS = ["staged", "program", "weights", "tokenizer", "arena_plans", "manifest"]
CHECKPOINTS += ["synced", "swapped", "published"]


def compile_proc(model_dir, out, *extra, kill_at: str | None = None):
    env = {**os.environ, "XLLM_DEBUG_KILL_AT": kill_at} if kill_at else None
    cmd = [sys.executable, "-m", "xllm_compile", "compile", str(model_dir), "--out", str(out)]
    return subprocess.run(
        [*cmd, "--quiet", *extra], capture_output=True, text=True, timeout=300, env=env
    )


def leftovers(out) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def passes_of(out) -> list:
    return json.loads((out / MANIFEST).read_text())["passes"]


@pytest.fixture
def model_dir(family_models):
    return family_models("llama3")[1]


def test_sigkill_at_every_checkpoint_leaves_a_loadable_artifact(model_dir, tmp_path):
    out = compile_cli(model_dir, tmp_path / "art", "--passes", "none")  # the "old" artifact
    assert passes_of(out) == []
    for checkpoint in CHECKPOINTS:
        proc = compile_proc(model_dir, out, kill_at=checkpoint)
        assert proc.returncode == -9, (checkpoint, proc.stderr)
        open_artifact(out)  # complete, every hash right
        swapped = CHECKPOINTS.index(checkpoint) >= CHECKPOINTS.index("swapped")
        assert bool(passes_of(out)) == swapped, checkpoint  # old before the swap, new after
        assert load(out).generate([[1, 2, 3]], max_tokens=2)[0].token_ids
        compile_cli(model_dir, out, "--passes", "none")  # back to old; clears the leftovers
        assert leftovers(out) == [], checkpoint


def test_a_killed_fallback_swap_is_put_back(model_dir, tmp_path):
    """Where the file system cannot exchange two names, the old artifact is moved aside first;
    a compile killed right then leaves it there, and the next one moves it back."""
    out = compile_cli(model_dir, tmp_path / "art", "--passes", "none")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    aside = out.with_name(f".art.xllm-old-{dead}-0badf00d")
    out.rename(aside)
    (tmp_path / f".art.xllm-tmp-{dead}-12345678").mkdir()  # and a half-written one
    clean_stale(out)
    open_artifact(out)
    assert leftovers(out) == []


def mount_tmpfs(path, size: int) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return proc.returncode == 0


def disk_bytes(folder) -> int:
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in folder.iterdir())  # tmpfs pages


@pytest.mark.parametrize("room", [0.1, 0.5, 0.9])
def test_out_of_space_keeps_the_old_artifact_and_exits_2(model_dir, tmp_path, room):
    """ENOSPC somewhere in the new artifact's files (where depends on `room`: the share of the
    new artifact that fits beside the old one): exit 2 with one line, the old artifact intact,
    no temp folders."""
    probe = compile_cli(model_dir, tmp_path / "probe", "--passes", "none")
    new = compile_cli(model_dir, tmp_path / "new")
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, disk_bytes(probe) + int(room * disk_bytes(new))):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        out = disk / "art"
        shutil.copytree(probe, out)
        before = (out / MANIFEST).read_text()
        proc = compile_proc(model_dir, out)  # the default passes: a different, larger artifact
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "No space left" in lines[0] and "unchanged" in lines[0], lines[0]
        assert (out / MANIFEST).read_text() == before
        open_artifact(out)
        assert leftovers(out) == []
    finally:
        subprocess.run(["umount", str(disk)], check=False)
