"""Building the C++ CPU kernels: a lock no dead process can hold, a build killed half-way that
does not hang the next one, per-hash build folders, and a wheel (not the checkout) that builds
and uses them from a fresh virtual environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xllm_compile.kernels.cpu import build

ROOT = Path(__file__).resolve().parents[2]


def test_a_held_lock_times_out_with_a_clear_error(tmp_path):
    lock = tmp_path / "x.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import fcntl,os,time; fd=os.open({str(lock)!r}, os.O_RDWR|"
            "os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); "
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(build.KernelBuildError, match="another process has held"):
            with build._locked(lock, timeout_s=0.5):
                pass
    finally:
        holder.kill()
        holder.wait()
    with build._locked(lock, timeout_s=5):  # a dead holder's flock is gone with it
        assert lock.read_text() == str(os.getpid())


def test_build_name_depends_on_sources_and_versions(monkeypatch, tmp_path):
    name = build.build_name()
    assert name.startswith("xllm_cpu_") and name == build.build_name()
    monkeypatch.setattr(build, "CFLAGS", ("-O2",))
    assert build.build_name() != name
    monkeypatch.setenv("XLLM_KERNEL_DIR", str(tmp_path))
    assert build.library_path().parent.parent == tmp_path


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """The project built as a wheel and installed (no -e) into a fresh venv that reuses this
    environment's packages (torch) but not its xllm_compile."""
    root = tmp_path_factory.mktemp("wheel")
    source = shutil.copytree(  # setuptools builds in-tree: keep the checkout clean
        ROOT,
        root / "src",
        ignore=shutil.ignore_patterns(".git", "build", "artifacts", "*.egg-info", "__pycache__"),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(root / "dist"),
            str(source),
        ],
        check=True,
        timeout=600,
    )
    wheel = next((root / "dist").glob("xllm_compile-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True)
    return python


def test_wheel_builds_and_uses_the_kernels_after_a_killed_build(wheel_venv, tmp_path):
    env = {**os.environ, "XLLM_KERNEL_DIR": str(tmp_path / "kernels")}
    xllm = [str(wheel_venv), "-m", "xllm_compile"]
    # a first build killed half-way leaves torch's JIT lock behind
    first = subprocess.Popen([*xllm, "build-kernels"], env=env, stderr=subprocess.PIPE, text=True)
    assert "building the C++ CPU kernels" in first.stderr.readline()
    deadline = time.monotonic() + 60
    while not list((tmp_path / "kernels").glob("*/lock")) and time.monotonic() < deadline:
        time.sleep(0.1)
    first.kill()
    first.wait()
    assert list((tmp_path / "kernels").glob("*/lock")), "torch's lock should be left behind"
    done = subprocess.run(
        [*xllm, "build-kernels"], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    so = Path(done.stdout.strip())
    assert so.is_file() and so.is_relative_to(tmp_path / "kernels")
    check = (
        "import torch, xllm_compile, xllm_compile.kernels as k;"
        "import xllm_compile.kernels.triton.attention, xllm_compile.runtime.prefix_cache;"
        "from xllm_compile.kernels.cpu import ensure_loaded;"
        "print(xllm_compile.__file__); print(ensure_loaded());"
        "x = torch.randn(3, 64); w = torch.ones(64);"
        "print(torch.allclose(k.rms_norm(x, w, 1e-6), "
        "x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)))"
    )
    out = subprocess.run(
        [str(wheel_venv), "-c", check],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # not the checkout: its folders must not shadow the installed package
    )
    module, loaded, equal = out.stdout.split()
    assert str(wheel_venv.parent.parent) in module, module  # the wheel, not the checkout
    assert loaded == "None" and equal == "True", out.stderr
