"""Publishing a folder so that its path holds the old or the new content at every instant.

    with Staging(out) as tmp:      # .OUT.xllm-tmp-<pid>-<hex>, beside OUT (same file system)
        write files into tmp       # any OSError: tmp removed, OUT untouched, a one-line error
    (on leaving the block)         # fsync every file and tmp; renameat2(RENAME_EXCHANGE) swaps
                                   # tmp and OUT in one step; the old content is then removed

Where the file system cannot exchange (EINVAL), OUT is renamed aside to .OUT.xllm-old-<pid>-<hex>
first and renamed back on failure; a compile killed between the two renames leaves that folder,
and the next Staging of OUT moves it back. Leftovers of dead processes (tmp, old, gguf) are
removed on entry. Kill checkpoints for tests (env.kill_at): staged, synced, swapped, published.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
from pathlib import Path

from xllm_compile import env
from xllm_compile.errors import ArtifactError

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


class Staging:
    """A temporary sibling folder of `out`, swapped into place when the block succeeds."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.tmp = sibling(self.out, "tmp")

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(self.out)
        self.tmp.mkdir()
        env.kill_at("staged")
        return self.tmp

    def __exit__(self, kind, value, tb) -> bool:
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(value, OSError):  # ENOSPC, EACCES, EIO...: the user's to fix
                raise write_error(self.out, value) from None
            return False
        try:
            _fsync_tree(self.tmp)
            env.kill_at("synced")
            _swap_in(self.tmp, self.out)
        except OSError as e:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise write_error(self.out, e) from None
        env.kill_at("published")
        return False


def sibling(out: Path, kind: str) -> Path:
    return out.with_name(f".{out.name}.xllm-{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def write_error(out: Path, e: OSError) -> ArtifactError:
    where = f" ({e.filename})" if e.filename else ""
    return ArtifactError(
        f"cannot write the artifact {out}: {e.strerror or e}{where}; "
        + ("the previous artifact there is unchanged" if out.exists() else "nothing was written")
    )


def clean_stale(out: Path) -> None:
    """Remove what killed compiles of `out` left beside it; put back an artifact a killed
    fallback swap had moved aside (only when `out` itself is missing)."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.xllm-(tmp|old|gguf)-(\d+)-[0-9a-f]+")
    for path in sorted(out.parent.glob(f".{out.name}.xllm-*")):
        m = pattern.fullmatch(path.name)
        if not m or _alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not out.exists():
            path.rename(out)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_in(new: Path, out: Path) -> None:
    if not out.exists():
        new.rename(out)
    elif _exchange(new, out):  # `out` is new now, `new` holds the old artifact
        env.kill_at("swapped")
        shutil.rmtree(new, ignore_errors=True)
    else:
        old = sibling(out, "old")
        out.rename(old)
        env.kill_at("swapped")
        try:
            new.rename(out)
        except OSError:
            old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(out.parent)


def _exchange(a: Path, b: Path) -> bool:
    """renameat2(RENAME_EXCHANGE): True when done, False where unsupported."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))
