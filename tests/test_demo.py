"""``otel-audit demo``: the example shop end to end, as a user runs it."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run(
        [sys.executable, "-m", "otel_audit", "demo", *args],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


def test_demo_runs_the_shop_prints_trails_and_verifies(tmp_path: pathlib.Path):
    result = run_demo("--dir", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "alice: POST /orders -> 201" in out and "bob: POST /orders -> 403" in out
    assert out.count("\ntrail ") == 3
    assert "alice did order.create: success" in out and "bob did order.create: denied" in out
    # The tree reaches the second service and its notification back to alice.
    assert "stock.reserve" in out and "notify alice" in out and "[inventory]" in out
    assert "ok: " in out and "2 chains intact" in out
    assert (tmp_path / "audit.db").exists()
    # Checkpoints are signed, and verify checked the signatures.
    assert "(1 signatures verified)" in out and "signatures not checked" not in out


def test_demo_refuses_a_directory_with_a_ledger(tmp_path: pathlib.Path):
    (tmp_path / "audit.db").write_bytes(b"")
    result = run_demo("--dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"otel-audit: {tmp_path / 'audit.db'} exists: give the demo an empty --dir"
    ]


def test_demo_dir_errors_are_one_line(tmp_path: pathlib.Path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for target, reason in [(a_file, "File exists"), (tmp_path / "no" / "such", "No such file")]:
        result = run_demo("--dir", str(target))
        assert result.returncode == 2
        assert result.stderr == f"otel-audit: cannot use --dir '{target}': {reason}" + (
            " or directory\n" if reason == "No such file" else "\n"
        )
    assert not (tmp_path / "no").exists()
