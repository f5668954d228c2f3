"""Progress on a terminal, silence when piped, and Ctrl-C leaving no partial files."""

from __future__ import annotations

import io
import os
import pathlib
import pty
import signal
import subprocess
import sys
import time

import pytest

from otel_audit import vocabulary as v
from otel_audit._progress import Progress, atomic_output
from otel_audit.engine.ledger import open_ledger
from otel_audit.engine.record import Record, encode
from otel_audit.proof.chain import Checkpoint
from otel_audit.proof.keys import Signer, generate_keypair
from otel_audit.proof.merkle import Frontier

CLI = [sys.executable, "-m", "otel_audit"]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_line_has_percent_rate_and_eta() -> None:
    bar = Progress(1000, "verifying", stream=_Tty())
    bar._started = 100.0
    bar.done = 250
    assert bar.line(now=110.0) == (
        "verifying   25% [#####...............]  250/1,000 records  25/s  ETA 0:00:30"
    )
    unknown = Progress(None, "reading", stream=_Tty())
    unknown._started = 0.0
    unknown.done = 5000
    assert unknown.line(now=2.0) == "reading  5,000 records  2,500/s  elapsed 0:00:02"


def test_draws_on_a_terminal_and_is_silent_otherwise() -> None:
    tty, pipe = _Tty(), io.StringIO()
    for stream in (tty, pipe):
        with Progress(10, "x", stream=stream) as bar:
            for _ in range(10):
                bar.update()
    assert tty.getvalue().startswith("\rx") and tty.getvalue().endswith("ETA 0:00:00\n")
    assert "100% [####################]  10/10 records" in tty.getvalue()
    assert pipe.getvalue() == ""


def test_atomic_output_leaves_nothing_on_interrupt(tmp_path) -> None:
    target = tmp_path / "out.txt"
    with pytest.raises(KeyboardInterrupt), atomic_output(str(target)) as fh:
        fh.write("partial")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with atomic_output(str(target)) as fh:
        fh.write("whole")
    assert target.read_text() == "whole" and list(tmp_path.iterdir()) == [target]


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """A 60,000-record ledger with a signed checkpoint (appended directly, for speed)."""
    d = tmp_path_factory.mktemp("big")
    key, pub = d / "k.key", d / "k.pub"
    generate_keypair(key, pub)
    signer = Signer.from_file(key)
    path = d / "audit.db"
    ledger = open_ledger(f"sqlite:///{path}")
    bodies = [
        encode(Record(trace_id=f"{i:032x}", span_id=f"{i + 1:016x}", parent_span_id=None,
                      name="order.update", kind="INTERNAL", service="shop", start=10**18 + i, end=10**18 + i + 5,
                      attributes={v.EVENT: True, v.ACTION: "order.update", v.ACTOR_ID: f"user{i % 50}"}))
        for i in range(60_000)
    ]  # fmt: skip
    appended = ledger.append("shop", bodies)
    f = Frontier()
    for b in bodies:
        f.append(b)
    cp = Checkpoint(
        "shop", appended[-1].seq, appended[-1].hash, time.time_ns(), merkle_root=f.root()
    )
    ledger.add_checkpoint(Checkpoint(cp.chain, cp.seq, cp.head, cp.time, signer.sign(cp.message()),
                                     signer.key_id, cp.merkle_root))  # fmt: skip
    ledger.close()
    return path, pub


def _run_in_pty(args: list[str], cwd: pathlib.Path) -> tuple[int, str]:
    """Run with stderr on a pseudo-terminal (stdout piped); returns (exit code, terminal text)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, cwd=cwd
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    proc.communicate(timeout=120)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def test_bundle_and_verify_show_progress_on_a_terminal_only(big, tmp_path) -> None:
    path, pub = big
    out = tmp_path / "e.zip"
    code, tty = _run_in_pty(
        CLI + ["bundle", "--ledger", str(path), "-o", str(out), "--actor", "user7"], tmp_path
    )
    assert code == 0, tty
    assert "bundling  100% [####################]  1,200/1,200 records" in tty and "ETA" in tty
    code, tty = _run_in_pty(CLI + ["verify-bundle", str(out), "--public-key", str(pub)], tmp_path)
    assert code == 0 and "verifying  100%" in tty and "/s  ETA" in tty
    piped = subprocess.run(CLI + ["verify-bundle", str(out), "--public-key", str(pub)],
                           capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert piped.returncode == 0 and piped.stderr == ""
    assert piped.stdout.startswith("ok: 1200 records in 1 chains")


@pytest.mark.parametrize("command", ["bundle", "export"])
def test_ctrl_c_leaves_no_partial_output(big, tmp_path, command) -> None:
    path, _pub = big
    out = tmp_path / "out.file"
    args = {
        "bundle": ["bundle", "--ledger", str(path), "-o", str(out)],
        "export": ["export", "--ledger", str(path), "--format", "jaeger", "-o", str(out)],
    }[command]
    proc = subprocess.Popen(CLI + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Wait until the command is writing (its temporary file exists), then interrupt.
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".otel-audit-") for p in tmp_path.iterdir()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the command never started writing"
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().endswith("otel-audit: interrupted")
    assert list(tmp_path.iterdir()) == []
