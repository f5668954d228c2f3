"""The hash chain and its checkpoints.

Each record's hash is SHA-256 over the previous record's hash and the
record's canonical bytes; the first record of a chain follows ``GENESIS``.
A checkpoint states (chain, seq, head hash) and is signed with Ed25519 so a
reviewer holding only the public key can tell a rewritten history from the
real one. Thread-safe: immutable values and pure functions.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from otel_audit.engine.record import canonical_json

GENESIS = bytes(32)
CHECKPOINT_VERSION = 1


def link_hash(prev_hash: bytes, body: bytes) -> bytes:
    """SHA-256(prev_hash || body): the hash of one record in its chain."""
    h = hashlib.sha256(prev_hash)
    h.update(body)
    return h.digest()


@dataclass(frozen=True)
class Checkpoint:
    """A statement that ``chain`` had ``head`` as the hash of record ``seq`` at ``time``."""

    chain: str
    seq: int
    head: bytes
    time: int
    signature: bytes | None = None
    key_id: str | None = None
    #: Merkle tree root (RFC 9162) over the chain's records 1..seq, when computed.
    merkle_root: bytes | None = None

    def message(self) -> bytes:
        """The canonical bytes that are signed (the Merkle root only when present)."""
        fields: dict[str, object] = {
            "v": CHECKPOINT_VERSION,
            "chain": self.chain,
            "seq": self.seq,
            "head": self.head.hex(),
            "time": self.time,
        }
        if self.merkle_root is not None:
            fields["merkle_root"] = self.merkle_root.hex()
        return canonical_json(fields).encode("utf-8")

    def to_dict(self) -> dict[str, object]:
        return {
            "chain": self.chain,
            "seq": self.seq,
            "head": self.head.hex(),
            "time": self.time,
            "signature": self.signature.hex() if self.signature else None,
            "key_id": self.key_id,
            "merkle_root": self.merkle_root.hex() if self.merkle_root else None,
        }
