"""Checkpoints are made here, and only here: head, Merkle root, link, signer check, signature.

A checkpoint of a chain states its head (the hash of record ``seq``) and the
RFC 9162 Merkle root over records 1..seq, and is signed with Ed25519 when a
key is configured. Signed checkpoints (version 2 and 3) link to the
checkpoint signed before them (``Checkpoint.prev``), so deleting one from the
middle of a chain is seen by verify. Roots are over the records' chain hashes
(version 3, proof/merkle.py ``record_leaf``), except in a chain whose key last
signed a version 2 root over bodies: its signatures stay version 2, so each
new root is still provably an extension of the last one signed.

The rollback defence: a signer never signs a head that does not extend the
last head it signed. What it signed last is kept per chain in its *signer
state*, files beside the key (``<key file>.state/``, mode 0600, written
atomically and fsynced), outside the ledger, so someone who can rewrite the
ledger but not the key's directory cannot make it forget. Before signing, the
records 1..N under the last signed root are read back from the ledger, their
root compared, and an RFC 9162 consistency proof from that root to the new
one checked. When that fails the signer refuses (``SignerRefused``: logged,
counted, no signature) and puts its last signed checkpoint back into the
ledger if it is missing there, so ``verify`` names the rewritten records.

``Checkpointer`` is used by one writer thread (not thread-safe). Signer state
is shared between processes (gunicorn workers that append to one chain with
one key) under an exclusive file lock where the platform has ``fcntl``.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import operator
import os
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from otel_audit.engine.ledger import Appended, Ledger, Query
from otel_audit.errors import AuditError, VerificationError
from otel_audit.proof.chain import CHECKPOINT_VERSION, GENESIS, Checkpoint, CheckpointDamage
from otel_audit.proof.keys import Signer
from otel_audit.proof.merkle import (
    Frontier,
    advance,
    extension_proof,
    leaf_hashes,
    record_leaves,
    verify_consistency,
)

try:  # POSIX; elsewhere the state is guarded within one process only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_log = logging.getLogger("otel_audit")

STATE_FORMAT = "otel-audit-signer-state"
#: Most committed records kept for the next checkpoint's Merkle leaves (``keep_committed``).
MAX_KEPT = 20_000
#: What a writer keeps of each record it committed: (seq, body, chain hash).
Kept = tuple[int, bytes, bytes]
_SEQ = operator.itemgetter(0)
_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()
# Descriptors holding a state file lock right now: a child inherits them, and
# an flock lasts while any copy is open, so the child closes its copies.
_HELD_FDS: set[int] = set()


def _fresh_locks_after_fork() -> None:
    # A lock another thread held at fork() stays held in the child forever:
    # the child (a gunicorn worker) starts with fresh ones; the file lock,
    # taken on a descriptor opened per use, still orders it against the parent.
    global _THREAD_LOCKS_GUARD
    for fd in list(_HELD_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_FDS.clear()
    _THREAD_LOCKS.clear()
    _THREAD_LOCKS_GUARD = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_locks_after_fork)


class SignerRefused(AuditError):
    """The signer would not sign: the ledger does not extend what it signed last."""


class SignerState:
    """What a signer last signed, one JSON file per chain in ``directory``.

    ``directory`` None keeps the state in memory (this process only).
    Thread-safe and, with ``fcntl``, safe between processes under ``locked``.
    """

    def __init__(self, directory: str | None) -> None:
        self.directory = directory
        self._memory: dict[str, Checkpoint] = {}

    def path(self, chain: str) -> str:
        assert self.directory is not None
        # Readable for an operator, unique for any chain name, short enough for any filesystem.
        name = urllib.parse.quote(chain, safe="")[:80]
        tag = hashlib.sha256(chain.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        return os.path.join(self.directory, f"{name}.{tag}.json")

    @contextmanager
    def locked(self, chain: str) -> Iterator[None]:
        """Hold the chain's state exclusively (threads of this process, and other processes)."""
        key = self.path(chain) if self.directory is not None else f"memory:{id(self)}:{chain}"
        with _THREAD_LOCKS_GUARD:
            lock = _THREAD_LOCKS.setdefault(key, threading.Lock())
        with lock:
            if self.directory is None or fcntl is None:
                yield
                return
            self._ensure_directory()
            try:
                fd = os.open(key + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                raise SignerRefused(
                    f"cannot open the signer state lock {key + '.lock'!r}: {exc.strerror}"
                ) from None
            _HELD_FDS.add(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                _HELD_FDS.discard(fd)
                os.close(fd)  # releases the lock

    def _ensure_directory(self) -> None:
        assert self.directory is not None
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise SignerRefused(
                f"cannot create the signer state directory {self.directory!r}: {exc.strerror}"
            ) from None

    def load(self, chain: str) -> Checkpoint | None:
        """The last checkpoint signed for ``chain``, or None when nothing was signed yet."""
        if self.directory is None:
            return self._memory.get(chain)
        path = self.path(chain)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SignerRefused(f"cannot read signer state {path!r}: {exc.strerror}") from None
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
                raise ValueError("not a signer state file")
            checkpoint = Checkpoint.from_dict(data["checkpoint"])
            if checkpoint.chain != chain or data.get("digest") != checkpoint.digest().hex():
                raise ValueError("its checkpoint does not match its digest or chain")
        except (ValueError, KeyError, TypeError) as exc:
            # Never guess: a damaged state stops signing until an operator looks.
            raise SignerRefused(f"signer state {path!r} is damaged ({exc})") from None
        return checkpoint

    def save(self, checkpoint: Checkpoint) -> None:
        """Record ``checkpoint`` as the last signed of its chain: atomic and durable."""
        if self.directory is None:
            self._memory[checkpoint.chain] = checkpoint
            return
        self._ensure_directory()
        path = self.path(checkpoint.chain)
        data = {
            "format": STATE_FORMAT,
            "chain": checkpoint.chain,
            "seq": checkpoint.seq,
            "head": checkpoint.head.hex(),
            "merkle_root": checkpoint.merkle_root.hex() if checkpoint.merkle_root else None,
            "digest": checkpoint.digest().hex(),
            "checkpoint": checkpoint.to_dict(),
        }
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, json.dumps(data, sort_keys=True, indent=1).encode("utf-8") + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the rename itself must survive a crash
            finally:
                os.close(dir_fd)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise SignerRefused(f"cannot write signer state {path!r}: {exc.strerror}") from None


def check_against_state(ledger: Ledger, state: SignerState) -> list[CheckpointDamage]:
    """What the ledger lost of what the signer remembers: for each chain the state
    knows, its last signed checkpoint must be in the ledger, and the record it
    covers must still have the signed head. Catches a rollback before the signer's
    next attempt does (for ``verify`` run where the key's directory is readable).
    """
    if state.directory is None or not os.path.isdir(state.directory):
        return []
    damage: list[CheckpointDamage] = []
    for name in sorted(os.listdir(state.directory)):
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(state.directory, name), "rb") as f:
                chain = json.loads(f.read())["chain"]
            last = state.load(chain) if isinstance(chain, str) else None
        except (OSError, ValueError, KeyError, TypeError, SignerRefused) as exc:
            damage.append(CheckpointDamage("", 0, "signer state", f"{name}: unreadable ({exc})"))
            continue
        if last is None:
            continue
        present = any(cp.digest() == last.digest() for cp in ledger.checkpoints(chain))
        stored = _record_at(ledger, chain, last.seq)
        if stored != last.head:
            damage.append(
                CheckpointDamage(
                    chain,
                    last.seq,
                    "modified" if stored is not None else "truncated",
                    f"the key last signed head {last.head.hex()} at seq {last.seq} (signer"
                    " state); the ledger's record "
                    + ("is gone" if stored is None else f"has hash {stored.hex()}"),
                )
            )
        elif not present:
            damage.append(
                CheckpointDamage(
                    chain,
                    last.seq,
                    "deleted",
                    f"the checkpoint the key last signed at seq {last.seq} (signer state)"
                    " is not in the ledger",
                )
            )
    return damage


def _record_at(ledger: Ledger, chain: str, seq: int) -> bytes | None:
    """The stored hash of record ``seq`` of ``chain``, None when there is none."""
    # One indexed row (a scan would fetch a whole batch after it).
    # No chain filter: with one, SQLite scans the chain instead of seeking the cursor.
    for row in ledger.query(Query(after=(chain, seq - 1), limit=1)):
        return row.hash if row.seq == seq and row.chain == chain else None
    return None


def keep_committed(kept: list[Kept], appended: Sequence[Appended], bodies: Sequence[bytes]) -> bool:
    """Add (seq, body, hash) of each record of an append (``appended`` and its
    ``bodies``) to ``kept`` (what ``Checkpointer.make`` may hash leaves from) when
    they are one run right after what it holds, within ``MAX_KEPT``; False when
    not, and the caller forgets ``kept`` (the checkpointer then reads the ledger
    back)."""
    if (
        not appended
        or len(appended) != len(bodies)
        or appended[-1].seq - appended[0].seq != len(bodies) - 1
        or (kept and kept[-1][0] >= appended[0].seq)
        or len(kept) + len(bodies) > MAX_KEPT
    ):
        return False
    kept.extend((a.seq, body, a.hash) for a, body in zip(appended, bodies))
    return True


def drop_covered(kept: list[Kept], seq: int) -> None:
    """Forget the kept records a checkpoint at ``seq`` covers (``kept`` is in seq order)."""
    del kept[: bisect.bisect_right(kept, seq, key=_SEQ)]


class Checkpointer:
    """Makes the checkpoints of one chain for one writer. Not thread-safe."""

    def __init__(self, chain: str, signer: Signer | None) -> None:
        self.chain = chain
        self.signer = signer
        self.state = SignerState(signer.state_path) if signer is not None else None
        # Trees this process has checked against a signed root (or the empty
        # tree), one per kind of leaf (True: chain hashes, version 3; False:
        # bodies): extended from the ledger, so a checkpoint costs only the
        # records since the last one, and several processes may share a chain.
        self._frontiers = {True: Frontier(), False: Frontier()}
        self._recent: list[Kept] = []
        self.refusals = 0

    def make(
        self,
        ledger: Ledger,
        head: Appended,
        io_lock: AbstractContextManager[Any],
        recent: list[Kept] | None = None,
    ) -> Checkpoint | None:
        """Make, sign and store the checkpoint of ``head``; None when there is nothing new.

        Raises SignerRefused when the ledger does not extend what the key
        signed last (or the signer state cannot be read or written), and
        another AuditError when the checkpoint cannot be stored.
        ``io_lock`` is held around every ledger call. ``recent``: (seq, body,
        hash) of what this writer committed since the last checkpoint, in order;
        when they are exactly the records after the tree's last leaf up to
        ``head`` (no other process appended between them), the leaves are
        hashed from them instead of read back from the ledger. Without them,
        a ledger that keeps what its own appends committed (``serve``'s
        ``IdempotentAppends.committed_records``, where the writer cannot) is
        asked for the same, under the same rule.
        """
        if not recent:
            kept = getattr(ledger, "committed_records", None)
            recent = kept(self.chain) if callable(kept) else None
        self._recent = recent or []
        if self.signer is None or self.state is None:
            return self._unsigned(ledger, head, io_lock)
        with self.state.locked(self.chain):
            last = self.state.load(self.chain)
            if last is not None and last.key_id != self.signer.key_id:
                # Another key's memory (the key file was replaced): it says
                # nothing about what this key signed.
                _log.warning(
                    "otel-audit: signer state of chain %r is for key %s, not %s; starting anew",
                    self.chain,
                    last.key_id,
                    self.signer.key_id,
                )
                last = None
            try:
                return self._signed(ledger, head, io_lock, self.signer, last)
            except SignerRefused:
                self.refusals += 1
                if last is not None:
                    self._restore(ledger, last, io_lock)
                raise

    def _advance(
        self,
        work: Frontier,
        ledger: Ledger,
        upto: int,
        io_lock: AbstractContextManager[Any],
        leaves: list[bytes] | None = None,
        *,
        hashes: bool,
    ) -> bool:
        """``merkle.advance``, from this writer's own committed records when they are the range.

        ``hashes``: leaves over chain hashes (version 3), else over bodies."""
        recent, first = self._recent, work.size + 1
        count = upto - first + 1
        if recent and count > 0:
            start = bisect.bisect_left(recent, first, key=_SEQ)
            end = start + count - 1
            # Seqs only grow: the first and the last in place, ``count`` apart,
            # means the range is exactly these records, none from another process.
            if end < len(recent) and recent[start][0] == first and recent[end][0] == upto:
                run = recent[start : end + 1]
                if hashes:
                    digests = record_leaves(digest for _, _, digest in run)
                else:
                    digests = leaf_hashes(body for _, body, _ in run)
                for digest in digests:
                    work.append_leaf_hash(digest)
                if leaves is not None:
                    leaves.extend(digests)
                return True
        with io_lock:
            return advance(work, ledger, self.chain, upto, leaves, hashes=hashes)

    def _unsigned(
        self, ledger: Ledger, head: Appended, io_lock: AbstractContextManager[Any]
    ) -> Checkpoint:
        # Without a key nothing is refused; a gap (damaged chain) means no
        # root rather than a wrong one. The root is over chain hashes, as a
        # version 3 one: unsigned, its version is not stated, and verify
        # without a key accepts either kind of root (proof/walk.py).
        kept = self._frontiers[True]
        work = kept.copy() if kept.size <= head.seq else Frontier()
        advanced = self._advance(work, ledger, head.seq, io_lock, hashes=True)
        if advanced:
            self._frontiers[True] = work
        checkpoint = Checkpoint(
            self.chain,
            head.seq,
            head.hash,
            time.time_ns(),
            merkle_root=work.root() if advanced else None,
        )
        with io_lock:
            ledger.add_checkpoint(checkpoint)
        return checkpoint

    def _signed(
        self,
        ledger: Ledger,
        head: Appended,
        io_lock: AbstractContextManager[Any],
        signer: Signer,
        last: Checkpoint | None,
    ) -> Checkpoint | None:
        chain = self.chain
        signed_seq = last.seq if last is not None else 0
        refuse = f"refusing to sign chain {chain!r} at seq {head.seq}"
        # A chain whose key last signed a root over bodies (version 2) keeps
        # signing those: only a root of the same kind extends it provably.
        hashes = last is None or last.merkle_root is None or last.hash_leaves
        version = CHECKPOINT_VERSION if hashes else 2
        if last is not None:
            with io_lock:
                stored = _record_at(ledger, chain, last.seq)
            if stored != last.head:
                raise SignerRefused(
                    f"{refuse}: the key last signed seq {last.seq} with head {last.head.hex()},"
                    + (
                        f" but the ledger holds no record {last.seq}"
                        if stored is None
                        else f" but the ledger's record {last.seq} now has hash {stored.hex()}"
                    )
                    + " (rolled back or rewritten)"
                )
            if head.seq <= last.seq:
                # Another process signed this far already; nothing new to sign.
                self._restore(ledger, last, io_lock)
                return None
        # The tree of the records the key signed, read back from the ledger.
        kept = self._frontiers[hashes]
        work = kept.copy() if kept.size <= signed_seq else Frontier()
        with io_lock:
            whole = advance(work, ledger, chain, signed_seq, hashes=hashes)
        if not whole:
            raise SignerRefused(f"{refuse}: records 1..{signed_seq} it signed are not all there")
        if last is not None and last.merkle_root is not None:
            if work.root() != last.merkle_root:
                raise SignerRefused(
                    f"{refuse}: records 1..{last.seq} no longer have the merkle root it signed"
                    " (rewritten)"
                )
        old = work.copy()
        appended: list[bytes] = []
        whole = self._advance(work, ledger, head.seq, io_lock, appended, hashes=hashes)
        if not whole:
            raise SignerRefused(f"{refuse}: the chain has a gap before seq {head.seq}")
        root = work.root()
        if last is not None and last.merkle_root is not None and old.size:
            # What a reviewer would check between the two signed roots (RFC 9162).
            try:
                verify_consistency(
                    old.size, work.size, last.merkle_root, root, extension_proof(old, appended)
                )
            except VerificationError as exc:  # pragma: no cover - the roots were just compared
                raise SignerRefused(f"{refuse}: {exc}") from None
        with io_lock:
            stored_cps = ledger.checkpoints(chain)
        if any(cp.seq == head.seq for cp in stored_cps):
            # Checkpointed already (a process without this state): a second,
            # different checkpoint at one seq could never be stored beside it.
            return None
        if last is not None:
            prev = last.digest()
        else:
            # First signature with this key's state: link to what the ledger holds.
            before = [cp for cp in stored_cps if cp.seq < head.seq]
            prev = before[-1].digest() if before else GENESIS
            # Trust on first use: said loudly when the ledger has history this
            # state never saw (an upgrade, or a state that was removed).
            _log.log(
                logging.WARNING if before else logging.INFO,
                "otel-audit: no signer state for chain %r in %s; trusting the ledger's"
                " records 1..%d as they are and remembering from now on",
                chain,
                self.state.directory if self.state is not None else "memory",
                head.seq,
            )
        unsigned = Checkpoint(
            chain,
            head.seq,
            head.hash,
            time.time_ns(),
            key_id=signer.key_id,
            merkle_root=root,
            version=version,
            prev=prev,
        )
        checkpoint = unsigned.signed(signer.sign(unsigned.message()), signer.key_id)
        if last is not None:
            self._restore(ledger, last, io_lock)
        assert self.state is not None
        # State first: a checkpoint in the ledger the state does not know would
        # let a restarted signer link past it; one the ledger lacks is put back.
        self.state.save(checkpoint)
        with io_lock:
            ledger.add_checkpoint(checkpoint)
        self._frontiers[hashes] = work
        return checkpoint

    def _restore(
        self, ledger: Ledger, last: Checkpoint, io_lock: AbstractContextManager[Any]
    ) -> None:
        """Put the last signed checkpoint back into the ledger when it is missing there."""
        try:
            with io_lock:
                at_seq = [cp for cp in ledger.checkpoints(self.chain) if cp.seq == last.seq]
                if any(cp.digest() == last.digest() for cp in at_seq):
                    return
                if not at_seq:
                    ledger.add_checkpoint(last)
        except Exception as exc:  # evidence is best effort; the refusal stands anyway
            _log.error("otel-audit: could not restore checkpoint %s: %s", last.seq, exc)
            return
        if at_seq:
            _log.error(
                "otel-audit: the ledger holds another checkpoint of chain %r at seq %d than the"
                " one this key signed (its signer state has it)",
                self.chain,
                last.seq,
            )
            return
        _log.error(
            "otel-audit: the checkpoint of chain %r at seq %d signed by this key was missing"
            " from the ledger; restored it from the signer state",
            self.chain,
            last.seq,
        )
