"""Bad output paths and out-of-range filter values: one line on stderr, exit 2,
never a traceback, never a stray temporary file."""

from __future__ import annotations

import json
import os
import pathlib
import random
import resource
import signal
import subprocess
import sys
import time

import pytest

from otel_audit import vocabulary as v
from otel_audit._progress import atomic_output
from otel_audit.cli import main
from otel_audit.engine.ledger import open_ledger
from otel_audit.engine.record import Record, encode
from otel_audit.errors import ConfigError
from otel_audit.proof.chain import Checkpoint
from otel_audit.proof.keys import Signer, generate_keypair
from otel_audit.proof.merkle import root_of

CLI = [sys.executable, "-m", "otel_audit"]
TRAIL = "00000000000000a1"
# 2024-01-01T00:00:00.123454 UTC is 1704067200123454000 ns; float arithmetic
# (timestamp() * 1e9) makes it 208 ns later, past a record 100 ns after it.
EXACT_NS = 1_704_067_200_123_454_000


@pytest.fixture(scope="module")
def ledger(tmp_path_factory) -> tuple[str, pathlib.Path]:
    """A small signed ledger: 5 records (20 KiB each) of one trail, a checkpoint with a Merkle root."""
    d = tmp_path_factory.mktemp("cli_errors")
    key, pub = d / "k.key", d / "k.pub"
    generate_keypair(key, pub)
    signer = Signer.from_file(key)
    path = d / "audit.db"
    rnd = random.Random(3)  # incompressible, so every output is over 64 KiB
    starts = [
        EXACT_NS - 5_000,
        EXACT_NS + 100,
        EXACT_NS + 10_000,
        EXACT_NS + 20_000,
        EXACT_NS + 30_000,
    ]
    bodies = [
        encode(Record(trace_id="ab" * 16, span_id=TRAIL if i == 0 else f"{i:016x}",
                      parent_span_id=None if i == 0 else TRAIL, name="order.update",
                      kind="INTERNAL", service="shop", start=start, end=start + 50,
                      attributes={v.EVENT: i == 0, v.ACTION: "order.update", v.ACTOR_ID: "alice",
                                  v.TRAIL_ID: TRAIL, "note": rnd.randbytes(10_000).hex()}))
        for i, start in enumerate(starts)
    ]  # fmt: skip
    with open_ledger(f"sqlite:///{path}") as led:
        appended = led.append("shop", bodies)
        cp = Checkpoint("shop", appended[-1].seq, appended[-1].hash, time.time_ns(),
                        merkle_root=root_of(bodies))  # fmt: skip
        led.add_checkpoint(Checkpoint(cp.chain, cp.seq, cp.head, cp.time, signer.sign(cp.message()),
                                      signer.key_id, cp.merkle_root))  # fmt: skip
    return f"sqlite:///{path}", pub


def _command(name: str, url: str, out: str) -> list[str]:
    return {
        "export": ["export", "--ledger", url, "-o", out],
        "trail": ["trail", "--ledger", url, TRAIL, "--format", "json", "-o", out],
        "bundle": ["bundle", "--ledger", url, "-o", out],
    }[name]


@pytest.mark.parametrize("command", ["export", "trail", "bundle"])
def test_unwritable_output_paths_are_one_line(ledger, tmp_path, capsys, command) -> None:
    url, _ = ledger
    folder = tmp_path / "adir"
    folder.mkdir()
    plain = tmp_path / "notdb.db"
    plain.write_text("")
    cases = {
        str(folder): "Is a directory",
        str(tmp_path / "nonexistdir" / "x.out"): "No such file or directory",
        str(plain / "x"): "Not a directory",
    }
    if os.path.exists("/proc/version"):  # a file whose folder cannot hold new files
        cases["/proc/version"] = "No such file or directory"
    for out, reason in cases.items():
        assert main(_command(command, url, out)) == 2, out
        assert capsys.readouterr().err == f"otel-audit: cannot write {out!r}: {reason}\n"
    # Nothing was left behind: no temporary file beside any target.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "notdb.db"]
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("command", ["trail", "bundle", "export"])
def test_a_full_disk_is_one_line_and_leaves_no_file(ledger, tmp_path, command) -> None:
    # RLIMIT_FSIZE makes the kernel refuse writes past 48 KiB with EFBIG, as a
    # full disk refuses them with ENOSPC (SIGXFSZ ignored so the write fails
    # instead of killing the process). SQLite's 32 KiB shared-memory file fits.
    url, _ = ledger
    out = tmp_path / "out.file"

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (48 * 1024, 48 * 1024))

    args = _command(command, url, str(out))
    proc = subprocess.run(CLI + args, capture_output=True, text=True, timeout=60,
                          preexec_fn=limit, check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"otel-audit: cannot write {str(out)!r}: File too large\n"
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_refuses_a_directory_before_any_work(tmp_path) -> None:
    entered = False
    with (
        pytest.raises(ConfigError, match=r"^cannot write '.*': Is a directory$"),
        atomic_output(str(tmp_path)),
    ):
        entered = True
    assert not entered and list(tmp_path.iterdir()) == []


OUT_OF_RANGE = [
    (["--until", "9999-12-31"], "--until '9999-12-31' is out of range"),
    (["--since", "0001-01-01"], "--since '0001-01-01' is out of range"),
    (["--since", "99999999999d"], "--since '99999999999d' is out of range"),
    (["--since", "9" * 5000 + "w"], "--since '" + "9" * 5000 + "w' is out of range"),
    (["--since", "0001-01-01T00:00:00+01:00"], "--since '0001-01-01T00:00:00+01:00' is out"),
    (["--until", "2262-04-12"], "--until '2262-04-12' is out of range"),
]


@pytest.mark.parametrize("command", ["search", "export", "bundle"])
def test_out_of_range_times_name_the_flag(ledger, tmp_path, capsys, command) -> None:
    url, _ = ledger
    out = tmp_path / "x.out"
    for flags, message in OUT_OF_RANGE:
        args = [command, "--ledger", url, *flags]
        if command != "search":
            args += ["-o", str(out)]
        assert main(args) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith(f"otel-audit: {message}") and err.count("\n") == 1, err
        assert "between 1677-09-22 and 2262-04-11 UTC" in err
    assert list(tmp_path.iterdir()) == []


def test_out_of_range_cursors_and_limits(ledger, capsys) -> None:
    url, _ = ledger
    cases = [
        (["--after", "shop:99999999999999999999999"],
         "otel-audit: --after 'shop:99999999999999999999999': seq is out of range"),
        (["--after", "shop:²"], "otel-audit: --after 'shop:²' is not a cursor like CHAIN:SEQ"),
        (["--after", "shop:" + "9" * 5000], "otel-audit: --after 'shop:999"),
        (["--limit", "99999999999999999999"], "otel-audit: --limit 99999999999999999999 is too large (at most 9223372036854775806)"),
    ]  # fmt: skip
    for flags, message in cases:
        assert main(["search", "--ledger", url, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    # The largest seq is still a valid cursor (nothing after it).
    assert main(["search", "--ledger", url, "--after", f"shop:{2**63 - 1}"]) == 0
    assert capsys.readouterr().err == "no records match\n"


def test_iso_times_are_exact_to_the_microsecond(ledger, capsys) -> None:
    # Record 2 starts 100 ns after 2024-01-01T00:00:00.123454Z: --since that
    # instant includes it, --until excludes it; float rounding got both wrong.
    url, _ = ledger
    at = "2024-01-01T00:00:00.123454Z"
    for command in ("search", "export"):  # export shares the filters
        for flag, expected in (("--since", [2, 3, 4, 5]), ("--until", [1])):
            assert main([command, "--ledger", url, "--format", "jsonl", flag, at]) == 0
            lines = capsys.readouterr().out.splitlines()
            assert [json.loads(line)["seq"] for line in lines] == expected, (command, flag)
