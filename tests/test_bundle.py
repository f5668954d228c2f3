"""Evidence bundles: written from a real ledger, verified offline, and every
single-byte change to any file of the bundle is detected."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import sqlite3
import struct
import time
import zipfile
import zlib

import pytest

from otel_audit.cli import main
from otel_audit.engine.ledger import open_ledger
from otel_audit.engine.record import Record, canonical_json, encode
from otel_audit.errors import VerificationError
from otel_audit.proof.bundle import MANIFEST, verify_bundle
from otel_audit.proof.chain import Checkpoint
from otel_audit.proof.keys import Signer, generate_keypair, load_public_key
from otel_audit.proof.merkle import root_of

from .test_trail import run_shop


@pytest.fixture
def shop(make_pipeline, tmp_path):
    # checkpoint_every=2: orders (4 records) has roots at 2 and 4; inventory (3) at 2 and,
    # from shutdown, 3. Records are proven against different checkpoints.
    return run_shop(make_pipeline, tmp_path, checkpoint_every=2)


def make_bundle(shop, tmp_path, capsys, *filters: str) -> bytes:
    out = tmp_path / "evidence.zip"
    args = ["bundle", "--ledger", shop.url, "-o", str(out), "--public-key", str(shop.public_key)]
    assert main(args + list(filters)) == 0
    capsys.readouterr()
    return out.read_bytes()


def members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def rezip(files: dict[str, bytes]) -> io.BytesIO:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    buf.seek(0)
    return buf


def _canonical(obj: object) -> bytes:
    return canonical_json(obj).encode("utf-8")


def rehash(files: dict[str, bytes]) -> dict[str, bytes]:
    """What an attacker who edits a file does next: fix the manifest's hashes."""
    manifest = json.loads(files[MANIFEST])
    manifest["files"] = {n: hashlib.sha256(files[n]).hexdigest() for n in manifest["files"]}
    files = dict(files)
    files[MANIFEST] = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    return files


def test_bundle_verifies_offline(shop, tmp_path, capsys) -> None:
    data = make_bundle(shop, tmp_path, capsys)
    files = members(data)
    assert set(files) == {"manifest.json", "records.jsonl", "proofs.jsonl", "checkpoints.json",
                          "public_key.pem", "info.json"}  # fmt: skip
    assert len(files["records.jsonl"].splitlines()) == 7
    cps = json.loads(files["checkpoints.json"])
    assert sorted((c["chain"], c["seq"]) for c in cps["checkpoints"]) == [
        ("inventory", 2), ("inventory", 3), ("orders", 2), ("orders", 4),
    ]  # fmt: skip
    assert sorted((c["chain"], c["old_seq"], c["new_seq"]) for c in cps["consistency"]) == [
        ("inventory", 2, 3), ("orders", 2, 4),
    ]  # fmt: skip
    shop.path.unlink()  # offline: the ledger is gone
    bundle = tmp_path / "evidence.zip"
    assert main(["verify-bundle", str(bundle), "--public-key", str(shop.public_key)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: 7 records in 2 chains proven against 4 checkpoints signed by key ")


def test_a_record_proven_without_the_others(shop, tmp_path, capsys) -> None:
    data = make_bundle(shop, tmp_path, capsys, "--actor", "alice", "--action", "order.create")
    files = members(data)
    (line,) = files["records.jsonl"].decode().splitlines()
    assert json.loads(line)["chain"] == "orders" and json.loads(line)["seq"] == 3
    report = verify_bundle(io.BytesIO(data), load_public_key(shop.public_key))
    assert (report.records, report.chains) == (1, 1)


def _mutations(files: dict[str, bytes], names: list[str]):
    for name in names:
        data = files[name]
        for i in range(len(data)):
            changed = dict(files)
            changed[name] = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]
            yield name, i, changed


def test_every_single_byte_change_is_detected(shop, tmp_path, capsys) -> None:
    data = make_bundle(shop, tmp_path, capsys, "--trail", shop.trails[0])
    key = load_public_key(shop.public_key)
    files = members(data)
    verify_bundle(rezip(files), key)  # the untouched bundle, re-zipped, is fine
    # 1. Any edit of any file, manifest included.
    checked = 0
    for _name, _i, changed in _mutations(files, sorted(files)):
        with pytest.raises(VerificationError):
            verify_bundle(rezip(changed), key)
        checked += 1
    # 2. The same edits by someone who also fixes the manifest's hashes: records,
    #    proofs, checkpoints, signatures and the key are still caught by the
    #    cryptography. (info.json is for people: only the manifest protects it.)
    evidence = [n for n in sorted(files) if n not in (MANIFEST, "info.json")]
    for name, i, changed in _mutations(files, evidence):
        try:
            verify_bundle(rezip(rehash(changed)), key)
        except VerificationError:
            checked += 1
            continue
        pytest.fail(f"a change of byte {i} of {name} went unnoticed")
    assert checked > 10_000
    # 3. Random other byte values at random positions, both ways.
    rnd = random.Random(6)
    for _ in range(2000):
        name = rnd.choice(evidence)
        i = rnd.randrange(len(files[name]))
        new = rnd.choice([b for b in range(256) if b != files[name][i]])
        changed = dict(files)
        changed[name] = files[name][:i] + bytes([new]) + files[name][i + 1 :]
        with pytest.raises(VerificationError):
            verify_bundle(rezip(rehash(changed)), key)


def test_damage_is_named_and_exits_1(shop, tmp_path, capsys) -> None:
    data = make_bundle(shop, tmp_path, capsys)
    files = members(data)
    lines = files["records.jsonl"].decode().splitlines()
    rec = json.loads(lines[0])  # inventory seq 1: under the checkpoint at seq 2
    body = json.loads(__import__("base64").b64decode(rec["body"]))
    body["attributes"]["audit.actor.id"] = "mallory"
    new_body = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    rec["body"] = base64.b64encode(new_body).decode()
    lines[0] = json.dumps(rec, sort_keys=True, separators=(",", ":"))
    files["records.jsonl"] = ("\n".join(lines) + "\n").encode()
    bad = tmp_path / "forged.zip"
    bad.write_bytes(rezip(rehash(files)).getvalue())
    assert main(["verify-bundle", str(bad), "--public-key", str(shop.public_key)]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"otel-audit: bundle damaged: records.jsonl line 1 (chain {rec['chain']!r} seq {rec['seq']}):"
        " inclusion proof does not lead to the checkpoint's merkle root\n"
    )
    # Another key: the checkpoints are not signed by it.
    generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
    good = tmp_path / "evidence.zip"
    assert main(["verify-bundle", str(good), "--public-key", str(tmp_path / "other.pub")]) == 1
    assert "public_key.pem is not the public key given for verification" in capsys.readouterr().err
    # Not a zip, missing file, missing key: one line each.
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"PK\x03\x04 not really")
    assert main(["verify-bundle", str(junk), "--public-key", str(shop.public_key)]) == 1
    assert capsys.readouterr().err == "otel-audit: bundle damaged: not a readable zip file\n"
    assert (
        main(["verify-bundle", str(tmp_path / "none.zip"), "--public-key", str(shop.public_key)])
        == 2
    )
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["verify-bundle", str(good), "--public-key", str(tmp_path / "none.pub")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_records_after_the_last_checkpoint_are_left_out_and_said(
    make_pipeline, tmp_path, capsys
) -> None:
    key, pub = tmp_path / "k.key", tmp_path / "k.pub"
    generate_keypair(key, pub)
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    pipeline, provider, _ = make_pipeline(
        url, service_name="shop", signing_key=str(key), checkpoint_every=2
    )
    from otel_audit import audit_action

    for i in range(3):
        with audit_action(
            "order.create",
            resource=("order", str(i)),
            actor="alice",
            tracer=provider.get_tracer("t"),
        ):
            pass
    # Still running: records 1-2 are under a checkpoint, record 3 is not yet.
    out = tmp_path / "e.zip"
    assert main(["bundle", "--ledger", url, "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "note: 1 selected records of chain 'shop' are not covered by a signed checkpoint" in err
    assert "wrote 2 records from 1 chains with 1 checkpoints" in err
    assert verify_bundle(str(out), load_public_key(pub)).records == 2
    # Nothing covered at all: an error, and no file.
    assert (
        main(["bundle", "--ledger", url, "-o", str(tmp_path / "f.zip"), "--resource-id", "2"]) == 2
    )
    assert "no selected record is covered by a signed checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "f.zip").exists()
    pipeline.shutdown()


def test_bundle_on_both_backends(
    make_pipeline, tmp_path, capsys, ledger_kind, ledger_url_for
) -> None:
    shop = run_shop(make_pipeline, tmp_path, checkpoint_every=2, url=ledger_url_for(ledger_kind))
    data = make_bundle(shop, tmp_path, capsys, "--actor", "alice")
    key = load_public_key(shop.public_key)
    report = verify_bundle(io.BytesIO(data), key)
    assert (report.records, report.chains) == (3, 1)  # alice's action and its two effects
    files = members(data)
    proofs = files["proofs.jsonl"]
    i = proofs.index(b'"path":["') + len(b'"path":["')
    files["proofs.jsonl"] = (
        proofs[:i] + (b"1" if proofs[i : i + 1] == b"0" else b"0") + proofs[i + 1 :]
    )
    with pytest.raises(VerificationError, match="inclusion proof does not lead to the checkpoint"):
        verify_bundle(rezip(rehash(files)), key)


def test_extra_missing_and_duplicate_files_are_named(shop, tmp_path, capsys) -> None:
    key = load_public_key(shop.public_key)
    files = members(make_bundle(shop, tmp_path, capsys))
    with pytest.raises(
        VerificationError,
        match=r"^bundle damaged: 'notes.txt' is not a member of an evidence bundle$",
    ):
        verify_bundle(rezip({**files, "notes.txt": b"hi"}), key)
    # Listed in the manifest with its right hash: still no proof covers it.
    manifest = json.loads(files[MANIFEST])
    manifest["files"]["notes.txt"] = hashlib.sha256(b"hi").hexdigest()
    listed = {**files, "notes.txt": b"hi", MANIFEST: _canonical(manifest)}
    with pytest.raises(VerificationError, match="'notes.txt' is not a member of an evidence"):
        verify_bundle(rezip(listed), key)
    without = {n: d for n, d in files.items() if n != "proofs.jsonl"}
    with pytest.raises(
        VerificationError, match="proofs.jsonl is listed in the manifest but missing"
    ):
        verify_bundle(rezip(without), key)
    buf = rezip(files)
    with zipfile.ZipFile(buf, "a") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        zf.writestr("records.jsonl", files["records.jsonl"])
    buf.seek(0)
    with pytest.raises(VerificationError, match="a file appears twice in the zip"):
        verify_bundle(buf, key)


def _data_offset(data: bytes, name: str) -> tuple[int, int]:
    """Where a member's compressed bytes are in the zip: (offset, length)."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = zf.getinfo(name)
    name_len, extra_len = struct.unpack(
        "<HH", data[info.header_offset + 26 : info.header_offset + 30]
    )
    return info.header_offset + 30 + name_len + extra_len, info.compress_size


def test_corrupt_compressed_data_is_damage_not_a_crash(shop, tmp_path, capsys) -> None:
    data = make_bundle(shop, tmp_path, capsys)
    key = load_public_key(shop.public_key)
    start, length = _data_offset(data, "records.jsonl")
    reasons, caught = set(), 0
    for i in range(start, start + min(length, 400)):
        flipped = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]
        try:
            verify_bundle(io.BytesIO(flipped), key)
        except VerificationError as exc:  # anything else fails the test
            reasons.add(str(exc).split(" (")[0])
            caught += 1
        # (A flip in an unused part of a Huffman table inflates to the same
        # bytes, CRC and all: the bundle is then genuinely intact.)
    # Some flips break the deflate stream itself (zlib), others only the CRC.
    assert reasons == {"bundle damaged: bundle member 'records.jsonl' is corrupt"}
    assert caught > 300
    # Through the CLI: a flip the inflater rejects is one line, exit 1.
    for i in range(start, start + length):
        flipped = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]
        try:
            with zipfile.ZipFile(io.BytesIO(flipped)) as zf:
                zf.read("records.jsonl")
        except zlib.error:
            break
        except zipfile.BadZipFile:
            continue
    else:
        pytest.fail("no single flip broke the deflate stream")
    crc = tmp_path / "crc.zip"
    crc.write_bytes(flipped)
    assert main(["verify-bundle", "--public-key", str(shop.public_key), str(crc)]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith(
            "otel-audit: bundle damaged: bundle member 'records.jsonl' is corrupt (Error -3"
        )
        and err.count("\n") == 1
    ), err


def test_deeply_nested_json_is_damage_not_a_crash(shop, tmp_path, capsys) -> None:
    files = members(make_bundle(shop, tmp_path, capsys))
    key = load_public_key(shop.public_key)
    deep = tmp_path / "deep.zip"
    deep.write_bytes(rezip({**files, MANIFEST: b"[" * 200_000}).getvalue())
    assert main(["verify-bundle", "--public-key", str(shop.public_key), str(deep)]) == 1
    assert capsys.readouterr().err == (
        "otel-audit: bundle damaged: manifest.json is not valid JSON (nested too deeply)\n"
    )
    # A record whose body is deep (its hash fixed up, as a forger would).
    lines = files["records.jsonl"].decode().splitlines()
    rec = json.loads(lines[0])
    body = b"[" * 200_000
    rec["body"] = base64.b64encode(body).decode()
    lines[0] = json.dumps(rec, sort_keys=True, separators=(",", ":"))
    forged = rehash({**files, "records.jsonl": ("\n".join(lines) + "\n").encode()})
    with pytest.raises(VerificationError, match=r"line 1 .*: record body is nested too deeply"):
        verify_bundle(rezip(forged), key)
    # Deep but closed, so the parser may accept it: then the canonical check must not crash.
    for depth in (900, 200_000):
        nested = rehash({**files, "checkpoints.json": b"[" * depth + b"]" * depth})
        with pytest.raises(VerificationError, match="checkpoints.json"):
            verify_bundle(rezip(nested), key)


def test_zip_bombs_are_refused_before_inflating(shop, tmp_path, capsys) -> None:
    files = members(make_bundle(shop, tmp_path, capsys))
    # 1. 64 MiB of zeros deflates to about 64 KiB: nothing otel-audit writes is like that.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        with zf.open("padding.bin", "w") as member:
            for _ in range(64):
                member.write(bytes(1 << 20))
    bomb = tmp_path / "bomb.zip"
    bomb.write_bytes(buf.getvalue())
    assert bomb.stat().st_size < 1 << 20
    assert main(["verify-bundle", "--public-key", str(shop.public_key), str(bomb)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        "otel-audit: bundle damaged: bundle member 'padding.bin' expands 67,108,864 bytes from"
    ) and err.endswith("not written by otel-audit (a zip bomb?)\n"), err
    # 2. A member whose directory entry declares more than the cap (and whose
    #    local header agrees): refused from the sizes alone, nothing inflated.
    raw = bytearray(rezip(files).getvalue())
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as zf:
        info = zf.getinfo("records.jsonl")
    huge = struct.pack("<I", 0xFFFF_FFF0)
    raw[info.header_offset + 18 : info.header_offset + 26] = huge + huge  # local sizes
    central = bytes(raw).index(b"PK\x01\x02")
    while struct.unpack("<I", raw[central + 42 : central + 46])[0] != info.header_offset:
        central = bytes(raw).index(b"PK\x01\x02", central + 1)
    raw[central + 20 : central + 28] = huge + huge  # central directory sizes
    big = tmp_path / "big.zip"
    big.write_bytes(bytes(raw))
    assert main(["verify-bundle", "--public-key", str(shop.public_key), str(big)]) == 1
    assert capsys.readouterr().err == (
        "otel-audit: bundle damaged: bundle member 'records.jsonl' is too large:"
        f" the bundle unpacks to more than {1 << 30:,} bytes\n"
    )


def test_bundle_names_the_first_damaged_record_as_verify_does(shop, tmp_path, capsys) -> None:
    con = sqlite3.connect(shop.path)
    con.execute("UPDATE records SET body=? WHERE chain='orders' AND seq=3", (b'{"v":1}',))
    con.commit()
    con.close()
    assert main(["verify", "--ledger", shop.url]) == 1
    verify_line = capsys.readouterr().err.strip()
    assert verify_line.startswith("otel-audit: chain 'orders' seq 3: modified")
    out = tmp_path / "e.zip"
    assert main(["bundle", "--ledger", shop.url, "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err == f"{verify_line}: cannot build proofs (run otel-audit verify)\n"
    assert not out.exists()
    # A changed hash (the bytes intact, so the Merkle root still matches) is
    # refused too, rather than written into a bundle that cannot verify.
    con = sqlite3.connect(shop.path)
    con.execute("UPDATE records SET hash=? WHERE chain='inventory' AND seq=1", (bytes(32),))
    con.commit()
    con.close()
    assert main(["bundle", "--ledger", shop.url, "-o", str(out), "--chain", "inventory"]) == 1
    assert capsys.readouterr().err.startswith("otel-audit: chain 'inventory' seq 1: modified")
    assert not out.exists()


def test_any_byte_of_the_zip_changed_is_damage_or_harmless(shop, tmp_path, capsys) -> None:
    # Headers, directory, compressed data: a change either leaves the files
    # unchanged (a timestamp, an unused bit) or is reported as damage, never a crash.
    data = make_bundle(shop, tmp_path, capsys, "--trail", shop.trails[0])
    key = load_public_key(shop.public_key)
    rnd = random.Random(7)
    damaged = 0
    for i in range(len(data)):
        for x in (0x01, 0x80, rnd.randrange(1, 256)):
            try:
                verify_bundle(io.BytesIO(data[:i] + bytes([data[i] ^ x]) + data[i + 1 :]), key)
            except VerificationError:
                damaged += 1
    assert damaged > 2 * len(data)


def test_a_bundle_shows_only_what_its_proofs_cover(shop, tmp_path, capsys) -> None:
    key = load_public_key(shop.public_key)
    files = members(make_bundle(shop, tmp_path, capsys))
    # Records carry their bytes and the prev_hash their leaf covers (a version 3
    # root is over chain hashes), not their own chain hash nothing could prove.
    for line in files["records.jsonl"].decode().splitlines():
        assert set(json.loads(line)) == {"chain", "seq", "body", "prev_hash"}

    def record_edited(change) -> io.BytesIO:
        lines = files["records.jsonl"].decode().splitlines()
        rec = json.loads(lines[0])
        change(rec)
        lines[0] = canonical_json(rec)
        return rezip(rehash({**files, "records.jsonl": ("\n".join(lines) + "\n").encode()}))

    with pytest.raises(VerificationError, match="no prev_hash, which its checkpoint's merkle"):
        verify_bundle(record_edited(lambda rec: rec.pop("prev_hash")), key)
    with pytest.raises(VerificationError, match="inclusion proof does not lead to the checkpoint"):
        verify_bundle(record_edited(lambda rec: rec.update(prev_hash="ab" * 32)), key)
    cps = json.loads(files["checkpoints.json"])
    first = cps["checkpoints"][0]
    assert set(first) == {"chain", "seq", "head", "time", "signature", "key_id", "merkle_root",
                          "prev"}  # fmt: skip

    def edited(change) -> dict[str, bytes]:
        data = json.loads(files["checkpoints.json"])
        change(data["checkpoints"][0])
        return rehash({**files, "checkpoints.json": _canonical(data)})

    # The key id and the link are inside the signed message of a linked checkpoint.
    with pytest.raises(VerificationError, match="names key 'ffffffffffffffff', not the given key"):
        verify_bundle(rezip(edited(lambda cp: cp.update(key_id="f" * 16))), key)
    with pytest.raises(VerificationError, match="signature does not verify"):
        verify_bundle(rezip(edited(lambda cp: cp.update(prev="ab" * 32))), key)
    # Link hashes shown beside a record (the version 1 layout) are refused in a version 2 bundle.
    lines = files["records.jsonl"].decode().splitlines()
    rec = json.loads(lines[0])
    rec["hash"] = "00" * 32
    lines[0] = canonical_json(rec)
    with pytest.raises(VerificationError, match="does not have the expected fields"):
        verify_bundle(
            rezip(rehash({**files, "records.jsonl": ("\n".join(lines) + "\n").encode()})), key
        )
    # A zip comment is text no hash covers.
    buf = rezip(files)
    with zipfile.ZipFile(buf, "a") as zf:
        zf.comment = b"approved by the auditor"
    buf.seek(0)
    with pytest.raises(VerificationError, match="the zip has a comment"):
        verify_bundle(buf, key)


@pytest.mark.parametrize(
    "member, path, value",
    [
        ("manifest.json", ("version",), "2"),
        ("manifest.json", ("version",), 2.0),
        ("manifest.json", ("files", "records.jsonl"), 7),
        ("manifest.json", ("files",), ["records.jsonl"]),
        ("info.json", ("records",), True),
        ("checkpoints.json", ("checkpoints", 0, "seq"), "2"),
        ("checkpoints.json", ("checkpoints", 0, "seq"), True),
        ("checkpoints.json", ("checkpoints", 0, "chain"), ["orders"]),
        ("checkpoints.json", ("checkpoints", 0, "key_id"), 7),
        ("checkpoints.json", ("checkpoints", 0, "prev"), None),
        ("checkpoints.json", ("checkpoints", 0, "signature"), {"hex": "00"}),
        ("checkpoints.json", ("checkpoints",), {"0": {}}),
        ("checkpoints.json", ("consistency", 0, "path"), "00" * 32),
        ("checkpoints.json", ("consistency", 0, "old_seq"), 2.5),
        ("records.jsonl", (0, "seq"), "1"),
        ("records.jsonl", (0, "seq"), 0),
        ("records.jsonl", (0, "chain"), b"orders".hex()),
        ("records.jsonl", (0, "body"), ["e30="]),
        ("records.jsonl", (0,), ["chain", "seq", "body"]),
        ("proofs.jsonl", (0, "path"), {"0": "00"}),
        ("proofs.jsonl", (0, "leaf_index"), False),
        ("proofs.jsonl", (0, "checkpoint_seq"), None),
    ],
)
def test_type_confusion_in_a_bundle_is_a_clear_error(
    shop, tmp_path, capsys, member, path, value
) -> None:
    files = members(make_bundle(shop, tmp_path, capsys))
    if member.endswith(".jsonl"):
        data = [json.loads(line) for line in files[member].decode().splitlines()]
    else:
        data = json.loads(files[member])
    target = data
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    if member.endswith(".jsonl"):
        files[member] = "".join(canonical_json(item) + "\n" for item in data).encode()
    else:
        files[member] = _canonical(data)
    forged = tmp_path / "forged.zip"
    forged.write_bytes(rezip(rehash(files) if member != MANIFEST else files).getvalue())
    assert main(["verify-bundle", str(forged), "--public-key", str(shop.public_key)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("otel-audit: bundle damaged: ") and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "chain, seq, shown",
    [("chain", 0, "'orders' seq 0"), ("chain", -1, "'orders' seq -1"),
     ("chain", "'x1'", "'orders' seq 'x1'"), ("CAST(chain AS BLOB)", 1, "b'orders' seq 1")],
)  # fmt: skip
def test_bundle_refuses_a_row_outside_the_chain_sequence(
    shop, tmp_path, capsys, chain, seq, shown
) -> None:
    # An insider adds a copy of alice's record outside the sequence (no chain walk
    # reaches it): a seq below 1, a seq of text, a chain of bytes.
    with sqlite3.connect(shop.path) as con:
        con.execute(
            f"INSERT INTO records (chain, seq, prev_hash, hash, body) SELECT {chain}, {seq},"
            " prev_hash, hash, body FROM records WHERE chain = 'orders' AND seq = 1"
        )
    out = tmp_path / "evidence.zip"
    args = ["bundle", "--ledger", shop.url, "-o", str(out), "--public-key", str(shop.public_key)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err == (
        f"otel-audit: chain {shown}: inserted: the selection holds a row outside every"
        " chain's sequence; no bundle is written (run otel-audit verify)\n"
    )
    assert not out.exists()
    # A selection that does not include the stray row still yields evidence.
    assert main(args + ["--chain", "inventory"]) == 0
    capsys.readouterr()
    assert verify_bundle(str(out), load_public_key(shop.public_key)).chains == 1


def test_bundles_written_before_links_still_verify(tmp_path, capsys) -> None:
    """A version 1 bundle (records with their chain hashes, unlinked checkpoints), as
    older versions wrote it, verifies; verify-bundle says what in it is not proven."""
    key, pub = tmp_path / "k.key", tmp_path / "k.pub"
    generate_keypair(key, pub)
    signer = Signer.from_file(key)
    url = f"sqlite:///{tmp_path / 'old.db'}"
    bodies = [
        encode(Record(trace_id=f"{i:032x}", span_id=f"{i + 1:016x}", parent_span_id=None,
                      name="order.update", kind="INTERNAL", service="shop", start=i, end=i + 1,
                      attributes={"audit.event": True, "audit.action": "order.update"}))
        for i in range(3)
    ]  # fmt: skip
    with open_ledger(url) as ledger:
        appended = ledger.append("shop", bodies)
        cp = Checkpoint("shop", 3, appended[-1].hash, time.time_ns(), merkle_root=root_of(bodies))
        ledger.add_checkpoint(cp.signed(signer.sign(cp.message()), signer.key_id))
        rows = {row.seq: row for row in ledger.scan("shop")}
    out = tmp_path / "new.zip"
    assert main(["bundle", "--ledger", url, "-o", str(out)]) == 0
    capsys.readouterr()
    # Rewrite it in the version 1 layout.
    with zipfile.ZipFile(out) as zf:
        files = {n: zf.read(n) for n in zf.namelist()}
    records = []
    for line in files["records.jsonl"].decode().splitlines():
        rec = json.loads(line)
        rec["prev_hash"], rec["hash"] = (
            rows[rec["seq"]].prev_hash.hex(),
            rows[rec["seq"]].hash.hex(),
        )
        records.append(canonical_json(rec) + "\n")
    files["records.jsonl"] = "".join(records).encode()
    cps = json.loads(files["checkpoints.json"])
    for c in cps["checkpoints"]:
        del c["prev"]
    files["checkpoints.json"] = _canonical(cps)
    manifest = json.loads(files[MANIFEST])
    manifest["version"] = 1
    files[MANIFEST] = _canonical(manifest)
    old = tmp_path / "old.zip"
    old.write_bytes(rezip(rehash(files)).getvalue())
    assert main(["verify-bundle", str(old), "--public-key", str(pub)]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("ok: 3 records in 1 chains")
    assert (
        "note: a version 1 bundle: the prev_hash and hash shown beside each record are not" in shown
    )
    # Its link hashes are still checked against the bytes where they can be.
    rec = json.loads(records[0])
    rec["hash"] = "00" * 32
    files["records.jsonl"] = (canonical_json(rec) + "\n" + "".join(records[1:])).encode()
    with pytest.raises(VerificationError, match="hash does not match the record's bytes"):
        verify_bundle(rezip(rehash(files)), load_public_key(pub))
