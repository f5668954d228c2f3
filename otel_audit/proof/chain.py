"""The hash chain and its checkpoints.

Each record's hash is SHA-256 over the previous record's hash and the
record's canonical bytes; the first record of a chain follows ``GENESIS``.
A checkpoint states (chain, seq, head hash, Merkle root) and is signed with
Ed25519 so a reviewer holding only the public key can tell a rewritten
history from the real one.

Checkpoint messages are versioned. Version 1 (written before links existed)
signs chain, seq, head, time and the Merkle root. Version 2 also signs the
key id and ``prev``: the digest of the checkpoint before it in its chain
(``GENESIS`` for the first), so deleting a checkpoint from the middle of a
chain breaks the link of the one after it. Version 3 signs the same fields
and changes what its Merkle root is over: the records' chain hashes instead
of their bodies (proof/merkle.py, ``record_leaf``), so verify hashes each
body once, not twice (issue 13). The link is not stored in the
ledger: it is the digest of the stored predecessor, recomputed by whoever
verifies; the version of a stored checkpoint is the one its signature
verifies as. ``check_checkpoints`` walks a chain's checkpoints that way.
Thread-safe: immutable values and pure functions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from otel_audit.engine.record import canonical_json
from otel_audit.proof.keys import verify_signature

GENESIS = bytes(32)
#: The version of the checkpoints this version of otel-audit signs.
CHECKPOINT_VERSION = 3
#: Versions whose messages this version can verify.
CHECKPOINT_VERSIONS = (1, 2, 3)
#: Linked versions, newest first: what a stored checkpoint's signature is tried as.
LINKED_VERSIONS = (3, 2)


def link_hash(prev_hash: bytes, body: bytes) -> bytes:
    """SHA-256(prev_hash || body): the hash of one record in its chain."""
    h = hashlib.sha256(prev_hash)
    h.update(body)
    return h.digest()


@dataclass(frozen=True)
class Checkpoint:
    """A statement that ``chain`` had ``head`` as the hash of record ``seq`` at ``time``.

    ``version`` and ``prev`` say which message the signature covers: version
    1 (no link) unless stated. A checkpoint read back from a ledger carries
    version 1 until ``check_checkpoints`` has found which one it is.
    """

    chain: str
    seq: int
    head: bytes
    time: int
    signature: bytes | None = None
    key_id: str | None = None
    #: Merkle tree root (RFC 9162) over the chain's records 1..seq, when computed.
    merkle_root: bytes | None = None
    version: int = 1
    #: Version 2: ``digest()`` of the previous checkpoint of the chain (GENESIS if none).
    prev: bytes | None = None

    @property
    def hash_leaves(self) -> bool:
        """Version 3 and later: the Merkle root's leaves are the records' chain hashes
        (``merkle.record_leaf``), not their bodies (``merkle.leaf_hash``)."""
        return self.version >= 3

    def message(self) -> bytes:
        """The canonical bytes that are signed (the Merkle root only when present)."""
        fields: dict[str, object] = {
            "v": self.version,
            "chain": self.chain,
            "seq": self.seq,
            "head": self.head.hex(),
            "time": self.time,
        }
        if self.merkle_root is not None:
            fields["merkle_root"] = self.merkle_root.hex()
        if self.version >= 2:
            fields["prev"] = (self.prev if self.prev is not None else GENESIS).hex()
            fields["key_id"] = self.key_id
        return canonical_json(fields).encode("utf-8")

    def digest(self) -> bytes:
        """SHA-256 over the fields a ledger stores: what the next checkpoint links to.

        The signature is among them, and it covers this checkpoint's own link,
        so the digests chain every checkpoint to all those before it.
        """
        return hashlib.sha256(canonical_json(self._stored()).encode("utf-8")).digest()

    def _stored(self) -> dict[str, object]:
        """The fields a ledger stores (what ``digest`` covers and ``to_dict`` starts from)."""
        return {
            "chain": self.chain,
            "seq": self.seq,
            "head": self.head.hex(),
            "time": self.time,
            "signature": self.signature.hex() if self.signature else None,
            "key_id": self.key_id,
            "merkle_root": self.merkle_root.hex() if self.merkle_root else None,
        }

    def signed(self, signature: bytes, key_id: str) -> Checkpoint:
        return replace(self, signature=signature, key_id=key_id)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict; ``version`` and ``prev`` appear only for version 2 and later,
        so a version-1 checkpoint gives the same dict as before links existed."""
        out = self._stored()
        if self.version >= 2:
            out["version"] = self.version
            out["prev"] = (self.prev if self.prev is not None else GENESIS).hex()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Checkpoint:
        """The inverse of ``to_dict``; raises ValueError naming the first bad field."""

        def hexfield(name: str, length: int | None, required: bool) -> bytes | None:
            value = data.get(name)
            if value is None and not required:
                return None
            if not isinstance(value, str):
                raise ValueError(f"checkpoint {name} is not a hex string")
            raw = bytes.fromhex(value)
            if raw.hex() != value or (length is not None and len(raw) != length):
                raise ValueError(f"checkpoint {name} is not a valid hash")
            return raw

        chain, seq, at = data.get("chain"), data.get("seq"), data.get("time")
        version = data.get("version", 1)
        key = data.get("key_id")
        if not isinstance(chain, str) or not chain:
            raise ValueError("checkpoint chain is missing")
        for name, value in (("seq", seq), ("time", at), ("version", version)):
            if type(value) is not int or value < 0:
                raise ValueError(f"checkpoint {name} is not a number")
        if version not in CHECKPOINT_VERSIONS:
            raise ValueError(f"checkpoint version {version} is not supported")
        if key is not None and not isinstance(key, str):
            raise ValueError("checkpoint key_id is not text")
        head = hexfield("head", 32, True)
        assert head is not None and isinstance(seq, int) and isinstance(at, int)
        return cls(
            chain,
            seq,
            head,
            at,
            hexfield("signature", 64, False),
            key,
            hexfield("merkle_root", 32, False),
            version,
            hexfield("prev", 32, version >= 2),
        )


@dataclass(frozen=True)
class CheckpointDamage:
    """One thing wrong with a chain's checkpoints, as verify names damage."""

    chain: str
    seq: int
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"chain {self.chain!r} seq {self.seq}: {self.kind}: {self.detail}"


def signed_linked(public_key: Ed25519PublicKey, cp: Checkpoint, prev: bytes) -> Checkpoint | None:
    """``cp`` as the linked version (newest first) its signature verifies as with the
    link ``prev``, or None when it verifies as none of them."""
    for version in LINKED_VERSIONS:
        linked = replace(cp, version=version, prev=prev)
        if _verifies(public_key, linked):
            return linked
    return None


def _verifies(public_key: Ed25519PublicKey, cp: Checkpoint) -> bool:
    return cp.signature is not None and verify_signature(public_key, cp.signature, cp.message())


def check_checkpoints(
    checkpoints: Sequence[Checkpoint], public_key: Ed25519PublicKey | None
) -> tuple[list[Checkpoint], list[CheckpointDamage]]:
    """Walk one chain's checkpoints in seq order: signatures and links.

    Returns the checkpoints with the version and link each was signed with
    (so ``message()`` is the signed one), and the damage found: an unsigned
    checkpoint, a signature that verifies as no version, or a linked (version
    2 or 3) checkpoint whose link is not the digest of the checkpoint before it (one
    was deleted, inserted or replaced). Version-1 checkpoints (older writers,
    ``serve`` before it signed through the writer) are accepted anywhere:
    their messages name their seq, so none can be moved. Without a key nothing
    can be checked and the checkpoints are returned as given.
    """
    ordered = sorted(checkpoints, key=lambda cp: cp.seq)
    if public_key is None:
        return ordered, []
    out: list[Checkpoint] = []
    damage: list[CheckpointDamage] = []
    before: Checkpoint | None = None
    for cp in ordered:
        link = before.digest() if before is not None else GENESIS
        where = f"checkpoint at seq {cp.seq}"
        if not cp.signature:
            damage.append(
                CheckpointDamage(cp.chain, cp.seq, "bad signature", f"{where} is not signed")
            )
            out.append(cp)
            before = cp
            continue
        resolved: Checkpoint | None = None
        if cp.version >= 2:
            # The link was stated (a bundle, an anchor): it must be this one.
            if _verifies(public_key, cp):
                resolved = cp
                if cp.prev != link:
                    damage.append(_gap(cp, before))
        else:
            resolved = signed_linked(public_key, cp, link)
            if resolved is None and _verifies(public_key, cp):
                resolved = cp
        if resolved is None:
            prior = f" (seq {before.seq})" if before is not None else ""
            damage.append(
                CheckpointDamage(
                    cp.chain,
                    cp.seq,
                    "bad signature",
                    f"{where}: signature does not verify with the public key: the checkpoint"
                    f" was edited, or a checkpoint between it and the one before it{prior}"
                    " was deleted",
                )
            )
            resolved = cp
        out.append(resolved)
        before = resolved
    return out, damage


def _gap(cp: Checkpoint, before: Checkpoint | None) -> CheckpointDamage:
    since = f"after seq {before.seq}" if before is not None else "before it"
    return CheckpointDamage(
        cp.chain,
        cp.seq,
        "deleted",
        f"checkpoint at seq {cp.seq} links to a checkpoint that is gone ({since})",
    )
