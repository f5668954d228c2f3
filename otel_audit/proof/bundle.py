"""Evidence bundles: selected records with proofs that verify offline.

A bundle is a zip file:

* ``records.jsonl``: one selected record a line (chain, seq, canonical body
  in base64), in ledger order, and, when its checkpoint's root is over chain
  hashes (version 3), its ``prev_hash``, which the leaf covers. Nothing else:
  a record's own chain hash cannot be proven without every record after it,
  so a bundle does not show it (version 1 bundles did; verify-bundle says
  they are not proven);
* ``proofs.jsonl``: for each record, an RFC 9162 inclusion proof of its leaf
  (its chain hash, or its body before version 3) against the Merkle root of
  the first signed checkpoint that covers it;
* ``checkpoints.json``: those checkpoints (signed, with Merkle roots), the
  newest signed checkpoint of each chain, and a consistency proof from each
  to the newest (the ledger only grew after every record's checkpoint). Each
  carries ``prev``, the digest of the checkpoint before it in the ledger,
  which the signature of a linked (version 2 or 3) checkpoint covers;
* ``public_key.pem`` (when given), ``info.json`` (what was selected, when; for
  people, not evidence);
* ``manifest.json``: the SHA-256 of every other file.

Verification needs only the bundle and the reviewer's copy of the public key:
signatures make the roots trustworthy, proofs tie each record's bytes to a
root, and every file is canonical JSON compared byte for byte, so any change
to a record, a proof, a checkpoint, a signature or the manifest is detected.
A member, a field or a value that no proof covers is rejected, not shown.
Not thread-safe (one bundle per call).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import IO, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from otel_audit._progress import Progress
from otel_audit.engine.ledger import Ledger, Query, StoredRecord
from otel_audit.engine.record import canonical_json, decode
from otel_audit.errors import ConfigError, VerificationError
from otel_audit.proof.chain import GENESIS, Checkpoint, link_hash, signed_linked
from otel_audit.proof.keys import key_id, public_key_pem, verify_signature
from otel_audit.proof.merkle import (
    Tree,
    leaf_hash,
    record_leaf,
    verify_consistency,
    verify_inclusion,
)

FORMAT = "otel-audit-evidence"
VERSION = 3
#: Bundle versions verify-bundle reads (1: records carried their chain hashes;
#: 3: a record under a version 3 checkpoint carries its prev_hash). A bundle
#: none of whose records needs that is written as version 2, which older
#: versions of verify-bundle read.
VERSIONS = (1, 2, 3)
MANIFEST = "manifest.json"
RECORDS = "records.jsonl"
PROOFS = "proofs.jsonl"
CHECKPOINTS = "checkpoints.json"
PUBLIC_KEY = "public_key.pem"
INFO = "info.json"
#: Every member a bundle may hold; anything else is rejected.
MEMBERS = frozenset({MANIFEST, RECORDS, PROOFS, CHECKPOINTS, PUBLIC_KEY, INFO})

#: The most a bundle may unpack to (about 1,850 bytes a record at 100,000
#: records, so some 550,000 records): verification holds it in memory, and
#: a crafted zip must not make it allocate more. ``write_bundle`` refuses to
#: write a bigger one.
MAX_BUNDLE_BYTES = 1 << 30
# Canonical JSON with hashes and base64 bodies deflates 10-15 times at most
# (measured: proofs 13x, records 9.5x); a member over 1 MiB that expands more
# than 200 times was crafted to.
_MAX_RATIO = 200
_MIN_RATIO_CHECKED = 1 << 20


@dataclass
class BundleSummary:
    """What ``write_bundle`` wrote."""

    records: int
    chains: int
    checkpoints: int
    skipped: dict[str, int]  # chain -> selected records no signed root covers yet


def _usable(checkpoints: Iterable[Checkpoint]) -> list[Checkpoint]:
    """The signed checkpoints with roots, each with ``prev`` set to the digest of
    the checkpoint stored before it (what a linked checkpoint's signature covers)."""
    out: list[Checkpoint] = []
    before: Checkpoint | None = None
    for cp in sorted(checkpoints, key=lambda cp: cp.seq):
        if cp.signature and cp.merkle_root is not None:
            out.append(replace(cp, prev=before.digest() if before is not None else GENESIS))
        before = cp
    return out


def _checkpoint_dict(cp: Checkpoint) -> dict[str, object]:
    fields = replace(cp, version=1).to_dict()
    fields["prev"] = (cp.prev or GENESIS).hex()
    return fields


def _unaccounted(stored: StoredRecord) -> VerificationError | None:
    """A selected row no chain walk reaches (seq below 1, a chain or seq of another type)."""
    chain, seq = stored.chain, stored.seq
    if isinstance(chain, str) and type(seq) is int and seq >= 1:
        return None
    return VerificationError(
        f"chain {chain!r} seq {seq!r}: inserted: the selection holds a row outside every"
        " chain's sequence; no bundle is written (run otel-audit verify)",
        chain=chain if isinstance(chain, str) else repr(chain),
        seq=seq if type(seq) is int else 0,
        kind="inserted",
    )


def _diagnose(ledger: Ledger, chain: str, newest: Checkpoint) -> VerificationError:
    """The first damage of ``chain``, named as ``otel-audit verify`` names it."""
    from otel_audit.review.trail import verify_chain

    try:
        # No key: the damage found here is in the records, not the signatures.
        verify_chain(ledger, chain)
    except VerificationError as exc:
        return VerificationError(
            f"{exc}: cannot build proofs (run otel-audit verify)",
            chain=exc.chain, seq=exc.seq, kind=exc.kind,
        )  # fmt: skip
    return VerificationError(
        f"chain {chain!r} seq {newest.seq}: modified: the records do not match the"
        " checkpoint's merkle root (run otel-audit verify)",
        chain=chain, seq=newest.seq, kind="modified",
    )  # fmt: skip


def write_bundle(
    ledger: Ledger,
    query: Query,
    out: IO[bytes],
    *,
    public_key: Ed25519PublicKey | None = None,
    filters: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> BundleSummary:
    """Write an evidence bundle of the records matching ``query`` to ``out`` (a binary file)."""
    selected: dict[str, list[StoredRecord]] = {}
    for stored in ledger.query(query):
        stray = _unaccounted(stored)
        if stray is not None:
            # Evidence must never carry a record verify does not walk.
            raise stray
        selected.setdefault(stored.chain, []).append(stored)
    if progress is not None:
        progress.total = sum(len(rows) for rows in selected.values())
    record_lines: list[str] = []
    proof_lines: list[str] = []
    used: dict[tuple[str, int], Checkpoint] = {}
    consistency: list[dict[str, Any]] = []
    skipped: dict[str, int] = {}
    version = 2  # until a record carries its prev_hash
    for chain in sorted(selected):
        rows = selected[chain]
        cps = _usable(ledger.checkpoints(chain))
        if public_key is not None:
            kid = key_id(public_key)
            cps = [cp for cp in cps if cp.key_id == kid]
        if not cps or rows[0].seq > cps[-1].seq:
            skipped[chain] = len(rows)
            continue
        newest = cps[-1]
        # One pass over the chain up to the newest root; proofs come from the tree.
        # The links are checked on the way: a bundle of damaged records would
        # only fail later, at the reviewer's, with a less precise message.
        by_hash: list[bytes] = []
        prevs: dict[int, bytes] = {}
        wanted = {row.seq for row in rows}
        expected = GENESIS
        intact = True
        for row in ledger.scan(chain):
            if row.seq > newest.seq:
                break
            if (
                row.seq != len(by_hash) + 1
                or row.prev_hash != expected
                or link_hash(row.prev_hash, row.body) != row.hash
            ):
                intact = False
                break
            by_hash.append(record_leaf(row.hash))
            if row.seq in wanted:
                prevs[row.seq] = row.prev_hash
            expected = row.hash
        if not intact or len(by_hash) != newest.seq:
            raise _diagnose(ledger, chain, newest)
        # Which leaves the newest root is over (its version is in its signature,
        # which needs no key here): the tree that gives it. Only checkpoints
        # whose roots the same tree gives are used; a chain signed over bodies
        # before and over chain hashes after is proven from the newer ones.
        hashes = True
        tree = Tree(by_hash)
        if tree.root() != newest.merkle_root:
            # A root over bodies (version 2): the same records, read again.
            by_body = [leaf_hash(row.body) for row in ledger.scan(chain, 0, newest.seq)]
            hashes, tree = False, Tree(by_body)
            if len(by_body) != newest.seq or tree.root() != newest.merkle_root:
                raise _diagnose(ledger, chain, newest)
        cps = [cp for cp in cps if tree.mth(0, cp.seq) == cp.merkle_root]
        cp_index = 0
        for stored in rows:
            if stored.seq > newest.seq:
                skipped[chain] = skipped.get(chain, 0) + 1
                continue
            while cps[cp_index].seq < stored.seq:
                cp_index += 1
            cp = cps[cp_index]
            used[(chain, cp.seq)] = cp
            line: dict[str, object] = {
                "chain": chain,
                "seq": stored.seq,
                "body": base64.b64encode(stored.body).decode("ascii"),
            }
            if hashes:
                line["prev_hash"] = prevs[stored.seq].hex()
                version = VERSION
            record_lines.append(canonical_json(line))
            proof_lines.append(
                canonical_json(
                    {
                        "chain": chain,
                        "seq": stored.seq,
                        "checkpoint_seq": cp.seq,
                        "leaf_index": stored.seq - 1,
                        "tree_size": cp.seq,
                        "path": [h.hex() for h in tree.inclusion_proof(stored.seq - 1, cp.seq)],
                    }
                )
            )
            if progress is not None:
                progress.update(1)
        used[(chain, newest.seq)] = newest
        for c, seq in sorted(used):
            if c == chain and seq < newest.seq:
                consistency.append(
                    {
                        "chain": chain,
                        "old_seq": seq,
                        "new_seq": newest.seq,
                        "path": [h.hex() for h in tree.consistency_proof(seq, newest.seq)],
                    }
                )
    if not record_lines:
        raise ConfigError(
            "no selected record is covered by a signed checkpoint with a merkle root yet"
            + (f" ({sum(skipped.values())} selected)" if skipped else " (none selected)")
        )
    files: dict[str, bytes] = {
        RECORDS: "".join(line + "\n" for line in record_lines).encode("utf-8"),
        PROOFS: "".join(line + "\n" for line in proof_lines).encode("utf-8"),
        CHECKPOINTS: canonical_json(
            {
                "checkpoints": [_checkpoint_dict(cp) for _, cp in sorted(used.items())],
                "consistency": consistency,
            }
        ).encode("utf-8"),
        INFO: canonical_json(
            {
                "created": time.time_ns(),
                "records": len(record_lines),
                "filters": filters or {},
                "generator": "otel-audit",
                "skipped_not_yet_checkpointed": skipped,
            }
        ).encode("utf-8"),
    }
    if public_key is not None:
        files[PUBLIC_KEY] = public_key_pem(public_key)
    size = sum(len(data) for data in files.values())
    if size > MAX_BUNDLE_BYTES - (1 << 20):  # room for the manifest
        # verify-bundle refuses more (it holds a bundle in memory): never write
        # evidence that cannot be checked.
        raise ConfigError(
            f"the selection is too large for one bundle: {len(record_lines):,} records make"
            f" {size:,} bytes, over the {MAX_BUNDLE_BYTES:,} that verify-bundle accepts;"
            " select fewer (e.g. --since/--until, --chain)"
        )
    manifest = {
        "format": FORMAT,
        "version": version,
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())},
    }
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(MANIFEST, canonical_json(manifest).encode("utf-8"))
        for name, data in sorted(files.items()):
            zf.writestr(name, data)
    return BundleSummary(len(record_lines), len({c for c, _ in used}), len(used), skipped)


# -- verification --------------------------------------------------------------


@dataclass
class BundleReport:
    """What a verified bundle proved, and what it holds that is not proven (``notes``)."""

    records: int
    chains: int
    checkpoints: int
    key_id: str
    notes: list[str] = field(default_factory=list)


def _bad(what: str) -> VerificationError:
    return VerificationError(f"bundle damaged: {what}", kind="bundle")


def _parse_canonical(text: str, where: str) -> Any:
    try:
        data = json.loads(text)
    except ValueError:
        raise _bad(f"{where} is not valid JSON") from None
    except RecursionError:
        # Nothing otel-audit writes nests more than a few levels.
        raise _bad(f"{where} is not valid JSON (nested too deeply)") from None
    try:
        canonical = canonical_json(data)
    except RecursionError:
        raise _bad(f"{where} is not valid JSON (nested too deeply)") from None
    except ValueError:  # NaN or an infinity: never written by otel-audit
        raise _bad(f"{where} is not in canonical form (edited)") from None
    if canonical != text:
        raise _bad(f"{where} is not in canonical form (edited)")
    return data


def _hex(data: dict[str, Any], key: str, where: str, length: int | None = 32) -> bytes:
    value = data.get(key)
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else None
    except ValueError:
        raw = None
    if raw is None or raw.hex() != value or (length is not None and len(raw) != length):
        raise _bad(f"{where}: {key} is not a valid hash")
    return raw


def _int(data: dict[str, Any], key: str, where: str) -> int:
    value = data.get(key)
    if type(value) is not int or value < 0:
        raise _bad(f"{where}: {key} is missing or not a number")
    return value


def _str(data: dict[str, Any], key: str, where: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise _bad(f"{where}: {key} is missing")
    return value


def _fields(data: Any, keys: set[str], where: str) -> dict[str, Any]:
    if not isinstance(data, dict) or set(data) != keys:
        raise _bad(f"{where} does not have the expected fields")
    return data


def verify_bundle(
    source: str | IO[bytes],
    public_key: Ed25519PublicKey,
    progress: Progress | None = None,
) -> BundleReport:
    """Verify a bundle offline; returns a report or raises VerificationError naming the damage."""
    try:
        zf = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, EOFError, NotImplementedError, ValueError, RuntimeError):
        # NotImplementedError: a damaged directory can claim a future zip version.
        raise _bad("not a readable zip file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read bundle: {exc.strerror or exc}") from exc
    with zf:
        if zf.comment:
            # Text shown by zip tools that no hash covers.
            raise _bad("the zip has a comment, which otel-audit never writes")
        infos = zf.infolist()
        names = [info.filename for info in infos]
        if len(names) != len(set(names)):
            # Two members of one name: a reader might see either; refuse both.
            raise _bad("a file appears twice in the zip")
        # Sizes from the zip's directory, checked before inflating anything: a
        # small crafted file must not make the verifier allocate gigabytes.
        total = 0
        for info in infos:
            total += info.file_size
            if total > MAX_BUNDLE_BYTES:
                raise _bad(
                    f"bundle member {info.filename!r} is too large: the bundle unpacks to more"
                    f" than {MAX_BUNDLE_BYTES:,} bytes"
                )
            if info.file_size > _MIN_RATIO_CHECKED and info.file_size > _MAX_RATIO * max(
                info.compress_size, 1
            ):
                raise _bad(
                    f"bundle member {info.filename!r} expands {info.file_size:,} bytes from"
                    f" {info.compress_size:,}: not written by otel-audit (a zip bomb?)"
                )
        contents: dict[str, bytes] = {}
        for info in infos:
            try:
                # zipfile stops at the declared size and checks the CRC at the end.
                with zf.open(info) as member:
                    data = member.read(info.file_size + 1)
            except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, RuntimeError) as exc:
                raise _bad(f"bundle member {info.filename!r} is corrupt ({exc})") from None
            except OSError as exc:  # e.g. a seek to a damaged offset
                raise _bad(f"bundle member {info.filename!r} is corrupt ({exc})") from None
            except NotImplementedError as exc:  # an unknown compression method
                raise _bad(f"bundle member {info.filename!r} cannot be read ({exc})") from None
            except MemoryError:
                raise _bad(f"bundle member {info.filename!r} is too large to read") from None
            if len(data) != info.file_size:
                raise _bad(f"bundle member {info.filename!r} is corrupt (wrong size)")
            contents[info.filename] = data
    return _verify_contents(contents, public_key, progress)


def _text(contents: dict[str, bytes], name: str) -> str:
    try:
        return contents[name].decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(f"{name} is not UTF-8") from None


def _verify_contents(
    contents: dict[str, bytes], public_key: Ed25519PublicKey, progress: Progress | None
) -> BundleReport:
    if MANIFEST not in contents:
        raise _bad(f"{MANIFEST} is missing")
    manifest = _fields(
        _parse_canonical(_text(contents, MANIFEST), MANIFEST),
        {"format", "version", "files"},
        MANIFEST,
    )
    if manifest["format"] != FORMAT:
        raise _bad(f"{MANIFEST}: not an otel-audit evidence bundle")
    version = manifest["version"]
    if type(version) is not int or version not in VERSIONS:
        raise _bad(f"{MANIFEST}: version {version!r} is not supported")
    listed = manifest["files"]
    if not isinstance(listed, dict):
        raise _bad(f"{MANIFEST}: files is not a table")
    present = set(contents) - {MANIFEST}
    for name in sorted((present | set(listed)) - MEMBERS):
        # A member no proof covers would be shown beside the evidence.
        raise _bad(f"{name!r} is not a member of an evidence bundle")
    for name in sorted(present - set(listed)):
        raise _bad(f"{name} is not listed in the manifest")
    for name in sorted(set(listed) - present):
        raise _bad(f"{name} is listed in the manifest but missing")
    for name in sorted(listed):
        if not isinstance(listed[name], str):
            raise _bad(f"{MANIFEST}: the hash of {name} is not text")
        if hashlib.sha256(contents[name]).hexdigest() != listed[name]:
            raise _bad(f"{name} does not match its hash in the manifest")
    for required in (RECORDS, PROOFS, CHECKPOINTS):
        if required not in contents:
            raise _bad(f"{required} is missing")
    kid = key_id(public_key)
    if PUBLIC_KEY in contents and contents[PUBLIC_KEY] != public_key_pem(public_key):
        raise _bad(f"{PUBLIC_KEY} is not the public key given for verification")

    # Checkpoints: each signed by the key, each with a root; consistency to the newest.
    cp_data = _fields(
        _parse_canonical(_text(contents, CHECKPOINTS), CHECKPOINTS),
        {"checkpoints", "consistency"},
        CHECKPOINTS,
    )
    checkpoints: dict[tuple[str, int], Checkpoint] = {}
    if not isinstance(cp_data["checkpoints"], list) or not isinstance(cp_data["consistency"], list):
        raise _bad(f"{CHECKPOINTS} does not have the expected fields")
    notes: list[str] = []
    keys = {"chain", "seq", "head", "time", "merkle_root", "signature", "key_id"}
    if version >= 2:
        keys.add("prev")
    unlinked = 0
    for i, raw in enumerate(cp_data["checkpoints"]):
        where = f"{CHECKPOINTS} checkpoint {i + 1}"
        d = _fields(raw, keys, where)
        cp = Checkpoint(
            _str(d, "chain", where),
            _int(d, "seq", where),
            _hex(d, "head", where),
            _int(d, "time", where),
            _hex(d, "signature", where, 64),
            _str(d, "key_id", where),
            _hex(d, "merkle_root", where),
        )
        name = f"checkpoint of chain {cp.chain!r} at seq {cp.seq}"
        if cp.key_id != kid:
            raise _bad(f"{name} names key {cp.key_id!r}, not the given key {kid}")
        if version >= 2:
            # Signed as linked (the signature covers prev and the key id) or,
            # before links existed, as version 1: then prev is not proven.
            signed_as = signed_linked(public_key, cp, _hex(d, "prev", where))
            if signed_as is not None:
                cp = signed_as
            elif verify_signature(public_key, cp.signature or b"", cp.message()):
                unlinked += 1
            else:
                raise _bad(
                    f"{name}: signature does not verify with the public key (the checkpoint,"
                    " its key id or its link to the checkpoint before it was changed)"
                )
        elif not verify_signature(public_key, cp.signature or b"", cp.message()):
            raise _bad(f"{name}: signature does not verify with the public key")
        if (cp.chain, cp.seq) in checkpoints:
            raise _bad(f"{name} appears twice")
        checkpoints[(cp.chain, cp.seq)] = cp
    newest: dict[str, Checkpoint] = {}
    for cp in checkpoints.values():
        if cp.chain not in newest or cp.seq > newest[cp.chain].seq:
            newest[cp.chain] = cp
    proven: set[tuple[str, int]] = set()
    for i, raw in enumerate(cp_data["consistency"]):
        where = f"{CHECKPOINTS} consistency proof {i + 1}"
        d = _fields(raw, {"chain", "old_seq", "new_seq", "path"}, where)
        chain = _str(d, "chain", where)
        old = checkpoints.get((chain, _int(d, "old_seq", where)))
        new = checkpoints.get((chain, _int(d, "new_seq", where)))
        if old is None or new is None or new is not newest.get(chain):
            raise _bad(f"{where} names a checkpoint that is not in the bundle")
        path = _path(d, where)
        if old.hash_leaves != new.hash_leaves:
            raise _bad(
                f"{where} (chain {chain!r} seq {old.seq} -> {new.seq}): the two roots are over"
                " different leaves (record bodies and chain hashes)"
            )
        try:
            verify_consistency(
                old.seq, new.seq, old.merkle_root or b"", new.merkle_root or b"", path
            )
        except VerificationError as exc:
            raise _bad(f"{where} (chain {chain!r} seq {old.seq} -> {new.seq}): {exc}") from None
        proven.add((chain, old.seq))
    for (chain, seq), cp in checkpoints.items():
        if cp is not newest[chain] and (chain, seq) not in proven:
            raise _bad(f"checkpoint of chain {chain!r} at seq {seq} has no consistency proof")

    # Records and their inclusion proofs, line by line, in the same order.
    record_lines = _text(contents, RECORDS).split("\n")
    proof_lines = _text(contents, PROOFS).split("\n")
    if record_lines[-1] != "" or proof_lines[-1] != "":
        raise _bad(f"{RECORDS} or {PROOFS} is cut short")
    record_lines.pop()
    proof_lines.pop()
    if len(record_lines) != len(proof_lines):
        raise _bad(
            f"{RECORDS} has {len(record_lines)} records but {PROOFS} has {len(proof_lines)} proofs"
        )
    if not record_lines:
        raise _bad(f"{RECORDS} is empty")
    if progress is not None:
        progress.total = len(record_lines)
    seen: set[tuple[str, int]] = set()
    used: set[tuple[str, int]] = set()
    record_keys = {"chain", "seq", "body"} | ({"prev_hash", "hash"} if version == 1 else set())
    for n, (rline, pline) in enumerate(zip(record_lines, proof_lines), start=1):
        where = f"{RECORDS} line {n}"
        r = _parse_canonical(rline, where)
        keys_here = record_keys
        if version >= 3 and isinstance(r, dict) and "prev_hash" in r:
            keys_here = record_keys | {"prev_hash"}  # checked against its checkpoint below
        r = _fields(r, keys_here, where)
        chain, seq = _str(r, "chain", where), _int(r, "seq", where)
        where = f"{RECORDS} line {n} (chain {chain!r} seq {seq})"
        if seq < 1:
            raise _bad(f"{where}: seq is outside every chain's sequence")
        try:
            body = (
                base64.b64decode(r["body"], validate=True) if isinstance(r["body"], str) else None
            )
        except ValueError:
            body = None
        if body is None or base64.b64encode(body).decode("ascii") != r["body"]:
            raise _bad(f"{where}: body is not valid base64")
        if (chain, seq) in seen:
            raise _bad(f"{where} appears twice")
        seen.add((chain, seq))
        digest: bytes | None = None
        prev_hash: bytes | None = None
        if version == 1:
            prev, digest = _hex(r, "prev_hash", where), _hex(r, "hash", where)
            if link_hash(prev, body) != digest:
                raise _bad(f"{where}: hash does not match the record's bytes")
        elif "prev_hash" in r:
            prev_hash = _hex(r, "prev_hash", where)
        try:
            decode(body)
        except ValueError as exc:
            raise _bad(f"{where}: {exc}") from None
        except RecursionError:
            raise _bad(f"{where}: body is not a record (nested too deeply)") from None
        pwhere = f"{PROOFS} line {n}"
        p = _fields(
            _parse_canonical(pline, pwhere),
            {"chain", "seq", "checkpoint_seq", "leaf_index", "tree_size", "path"},
            pwhere,
        )
        if p["chain"] != chain or p["seq"] != seq:
            raise _bad(f"{pwhere} is not the proof of {where}")
        found = checkpoints.get((chain, _int(p, "checkpoint_seq", pwhere)))
        if found is None:
            raise _bad(f"{pwhere}: its checkpoint is not in the bundle")
        cp = found
        if (
            _int(p, "tree_size", pwhere) != cp.seq
            or _int(p, "leaf_index", pwhere) != seq - 1
            or seq > cp.seq
        ):
            raise _bad(f"{pwhere}: leaf index or tree size do not match the record and checkpoint")
        if digest is not None and seq == cp.seq and digest != cp.head:
            raise _bad(f"{where}: hash does not match the checkpoint's head")
        if cp.hash_leaves:
            # The leaf is the record's chain hash: its prev_hash and body.
            if prev_hash is None:
                raise _bad(f"{where}: no prev_hash, which its checkpoint's merkle root covers")
            leaf = record_leaf(link_hash(prev_hash, body))
        else:
            if prev_hash is not None:
                raise _bad(f"{where}: prev_hash is not covered by its checkpoint's merkle root")
            leaf = leaf_hash(body)
        try:
            verify_inclusion(leaf, seq - 1, cp.seq, _path(p, pwhere), cp.merkle_root or b"")
        except VerificationError as exc:
            raise _bad(f"{where}: {exc}") from None
        used.add((chain, cp.seq))
        if progress is not None:
            progress.update(1)
    for (chain, seq), cp in checkpoints.items():
        if (chain, seq) not in used and cp is not newest[chain]:
            raise _bad(f"checkpoint of chain {chain!r} at seq {seq} proves no record")
    if INFO in contents:
        info = _parse_canonical(_text(contents, INFO), INFO)
        count = info.get("records") if isinstance(info, dict) else None
        if type(count) is not int or count != len(record_lines):
            raise _bad(f"{INFO} does not match the records")
    if version == 1:
        notes.append(
            "a version 1 bundle: the prev_hash and hash shown beside each record are not"
            " proven by the checkpoints (only the record bytes are)"
        )
    if unlinked:
        notes.append(
            f"{unlinked} checkpoints were signed before checkpoints were linked (version 1):"
            " their prev is not proven"
        )
    return BundleReport(len(record_lines), len(newest), len(checkpoints), kid, notes)


def _path(d: dict[str, Any], where: str) -> list[bytes]:
    path = d.get("path")
    if not isinstance(path, list):
        raise _bad(f"{where}: path is not a list")
    return [_hex({"h": h}, "h", where) for h in path]
