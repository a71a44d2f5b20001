"""Signed artifacts, for people who want origin as well as integrity: an ed25519 signature over
the exact bytes of manifest.json (which holds the sha256 of every other file) in manifest.sig.

    xllm keygen KEY                       KEY (PEM private key, mode 600) and KEY.pub
    xllm-compile MODEL --out ART --sign KEY
    xllm generate|chat|serve ART --trust KEYS   KEYS: a file of public keys, one per line
    load(ART, trust=KEYS)

Without --trust nothing is checked (integrity only, as before). With it, an artifact that is
unsigned, signed by another key, or whose manifest changed after signing is refused. Needs the
`cryptography` package (`pip install "xllm-compile[sign]"`).
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from xllm_compile.errors import ArtifactError, BackendUnavailableError, ConfigError

SIGNATURE = "manifest.sig"
PREFIX = "ed25519 "  # a public key line: "ed25519 <base64 of the 32 raw bytes>"


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise BackendUnavailableError(
            'signing needs the cryptography package: pip install "xllm-compile[sign]"'
        ) from None
    return serialization, ed25519


def generate_key(path: Path) -> Path:
    """Write a new private key to `path` (mode 600) and its public key to `path`.pub."""
    serialization, ed25519 = _crypto()
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = Path(path)
    if path.exists():
        raise ConfigError(f"{path} exists; choose another path (keys are never overwritten)")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = path.with_name(path.name + ".pub")
    pub.write_text(_public_line(key.public_key()) + "\n")
    return pub


def _public_line(public_key) -> str:
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PREFIX + base64.b64encode(raw).decode()


def load_key(key_path: str | Path):
    """The ed25519 private key at `key_path` (checked before a compile starts)."""
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"--sign {key_path}: not a readable unencrypted PEM key ({e})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"--sign {key_path}: not an ed25519 key (make one with xllm keygen)")
    return key


def sign(art_dir: Path, key) -> None:
    """Sign `art_dir`/manifest.json with `key` (from load_key)."""
    manifest = (Path(art_dir) / "manifest.json").read_bytes()
    body = {
        "algorithm": "ed25519",
        "public_key": _public_line(key.public_key()),
        "signature": base64.b64encode(key.sign(manifest)).decode(),
    }
    (Path(art_dir) / SIGNATURE).write_text(json.dumps(body, indent=2) + "\n")


def read_trusted(path: Path) -> frozenset[str]:
    """The public key lines of a --trust file (blank lines and # comments skipped)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"--trust {path}: {e.strerror or e}") from None
    keys = frozenset(line.strip() for line in lines if line.strip().startswith(PREFIX))
    if not keys:
        raise ConfigError(f"--trust {path}: no 'ed25519 ...' public key lines")
    return keys


def signer(art_dir: Path) -> str | None:
    """The public key line the artifact claims to be signed by (unverified), or None."""
    try:
        return json.loads((Path(art_dir) / SIGNATURE).read_text()).get("public_key")
    except (OSError, ValueError, AttributeError):
        return None


def verify(art_dir: Path, trusted: frozenset[str]) -> str:
    """Check manifest.sig against manifest.json and `trusted`; returns the signer's key line.

    Raises:
        ArtifactError: unsigned, signed by an untrusted key, or a signature that does not match.
    """
    _, ed25519 = _crypto()
    from cryptography.exceptions import InvalidSignature

    art_dir = Path(art_dir)
    try:
        body = json.loads((art_dir / SIGNATURE).read_text())
        public, signature = body["public_key"], base64.b64decode(body["signature"])
    except FileNotFoundError:
        raise ArtifactError(f"{art_dir} is not signed, and --trust asks for a signature") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{art_dir}/{SIGNATURE} is unreadable ({e})") from None
    if public not in trusted:
        raise ArtifactError(f"{art_dir} is signed by a key you do not trust: {public}")
    key = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(public[len(PREFIX) :]))
    try:
        key.verify(signature, (art_dir / "manifest.json").read_bytes())
    except InvalidSignature:
        raise ArtifactError(
            f"{art_dir}: the signature does not match manifest.json (changed after signing)"
        ) from None
    return public
