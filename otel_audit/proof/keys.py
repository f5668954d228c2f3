"""Ed25519 keys for signing checkpoints.

The private key signs chain heads; keep it out of the ledger and, ideally,
off the ledger's host (a secrets manager or a file readable only by the audit
writer). Anyone who can write the ledger and read the key can rewrite history
undetectably; anyone with only write access cannot. Beside the key lives the
signer state (``<key file>.state/``, see engine/checkpoints.py): what the key
last signed, so it never signs a rolled-back history. Thread-safe.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from otel_audit.errors import ConfigError


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: the first 16 hex of SHA-256 of its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class Signer:
    """Signs checkpoint messages with one Ed25519 private key.

    ``state_path`` is where the signer remembers what it last signed, per
    chain (``<key file>.state``, a directory beside the key, outside the
    ledger): it refuses to sign a head that does not extend that. None keeps
    the memory in the process only (a key given as an object).
    """

    def __init__(
        self, private_key: Ed25519PrivateKey, *, state_path: str | os.PathLike[str] | None = None
    ) -> None:
        self._key = private_key
        self.public_key = private_key.public_key()
        self.key_id = key_id(self.public_key)
        self.state_path = os.fspath(state_path) if state_path is not None else None

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], *, state_path: str | os.PathLike[str] | None = None
    ) -> Signer:
        """The key in ``path``; its signer state in ``state_path`` (default ``<path>.state``)."""
        state = state_path if state_path is not None else os.fspath(path) + ".state"
        return cls(load_private_key(path), state_path=state)


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {str(path)!r}: {exc.strerror}") from exc


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    data = _read(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"signing key {str(path)!r} is not a PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing key {str(path)!r} is not an Ed25519 key")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    data = _read(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"public key {str(path)!r} is not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"public key {str(path)!r} is not an Ed25519 key")
    return key


def verify_signature(public_key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        public_key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


def public_key_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def generate_keypair(
    private_path: str | os.PathLike[str], public_path: str | os.PathLike[str]
) -> str:
    """Write a new key pair (private key mode 0600, never overwritten); returns its key id."""
    for path in (private_path, public_path):
        if os.path.exists(path):
            raise ConfigError(f"key file {str(path)!r} already exists")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        # O_EXCL: never clobber an existing key; 0600 from creation, not chmod after.
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise ConfigError(f"key file {str(private_path)!r} already exists") from exc
    except OSError as exc:
        raise ConfigError(f"cannot create key file {str(private_path)!r}: {exc.strerror}") from exc
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    try:
        Path(public_path).write_bytes(public_key_pem(key.public_key()))
    except OSError as exc:
        raise ConfigError(f"cannot write public key {str(public_path)!r}: {exc.strerror}") from exc
    return key_id(key.public_key())
