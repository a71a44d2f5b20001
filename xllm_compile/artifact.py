"""The artifact directory: format, writing and verified reading.

    manifest.json        format version, model config, dtype, device, limits, pass log,
                         sha256 + size of every other file, versions
    program.json         the optimized torch.export program as its JSON schema (read without
                         pickle: program_format.py)
    weights.safetensors  the weights, in the program's parameter names
    tokenizer files      copied from the model folder when present

This module is shared by the compiler (writer) and the runtime (reader); it imports neither.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from xllm_compile import __version__
from xllm_compile.errors import ArtifactError

# 2: program.json instead of a pickling program.pt2; 3: q8_0/q4_0/q4_1 rows interleave their
# values in groups of 16 blocks (kernels/linear_q.py)
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
PROGRAM = "program.json"
WEIGHTS = "weights.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


def rank_file(name: str, rank: int) -> str:
    """Rank `rank`'s copy of a per-rank file: rank 0 keeps the plain name (a single-rank
    artifact is rank 0 of one), others insert .rank<N>: program.rank1.json."""
    if rank == 0:
        return name
    stem, dot, suffix = name.partition(".")
    return f"{stem}.rank{rank}{dot}{suffix}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    return {
        "xllm_compile": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def copy_tokenizer(model_dir: Path, out_dir: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out_dir / name)
            copied.append(name)
    return copied


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every file in `out_dir` (but the manifest) into the manifest and write it."""
    files = {}
    for path in sorted(out_dir.iterdir()):
        if path.name != MANIFEST and path.is_file():
            files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **manifest,
        "versions": versions(),
        "files": files,
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


@dataclass(frozen=True)
class Artifact:
    """A verified artifact directory and its manifest."""

    path: Path
    manifest: dict[str, Any]

    def file(self, name: str) -> Path:
        return self.path / name

    def has(self, name: str) -> bool:
        return name in self.manifest["files"]


def read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise ArtifactError(f"artifact folder not found: {path} (run xllm-compile first)")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{path} has no {MANIFEST}: not an xllm-compile artifact")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{manifest_path} is corrupt ({e}); recompile the model") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        got = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ArtifactError(
            f"{path}: artifact format {got}, this xllm-compile reads format {FORMAT_VERSION}; "
            "recompile the model with this version"
        )
    return manifest


def open_artifact(path: str | Path, verify: bool = True) -> Artifact:
    """Read and check an artifact: format version, then size and sha256 of every listed file.

    Raises:
        ArtifactError: naming the file that is missing, truncated or altered.
    """
    path = Path(path)
    manifest = read_manifest(path)
    for name, meta in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise ArtifactError(f"{path}: {name} is missing; recompile the model")
        if file.stat().st_size != meta["bytes"]:
            raise ArtifactError(
                f"{path}: {name} has {file.stat().st_size} bytes, the manifest says "
                f"{meta['bytes']} (truncated or replaced); recompile the model"
            )
        if verify and sha256_file(file) != meta["sha256"]:
            raise ArtifactError(
                f"{path}: {name} does not match its sha256 in the manifest (modified after "
                "compilation); recompile the model"
            )
    for name in (PROGRAM, WEIGHTS):
        if name not in manifest.get("files", {}):
            raise ArtifactError(f"{path}: the manifest lists no {name}; recompile the model")
    return Artifact(path=path, manifest=manifest)
