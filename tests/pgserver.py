"""Start and stop a real, throwaway PostgreSQL server from the machine's packages.

Used by the test fixtures (tests/plugins/postgres.py) and the benchmark
(benchmarks/bench_ledger.py). The server runs from a fresh ``initdb`` in a
temporary directory, listens on 127.0.0.1 on a free port (and a Unix socket in
the same directory), and runs as the ``postgres`` user (else ``nobody``) when
we are root, because PostgreSQL refuses to run as root. Not thread-safe: one
owner starts, restarts and stops it.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time

SUPERUSER = "postgres"


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries are missing or the server would not start."""


def find_bindir() -> str:
    """The directory holding ``initdb`` and ``pg_ctl``; raises PostgresUnavailable."""
    candidates = []
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        candidates.append(os.path.dirname(os.path.realpath(on_path)))
    # Debian keeps the server binaries off PATH, one directory per major version.
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for directory in candidates:
        if all(os.access(os.path.join(directory, b), os.X_OK) for b in ("initdb", "pg_ctl")):
            return directory
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in"
        " /usr/lib/postgresql/*/bin: install the 'postgresql' package (./scripts/test does)"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as() -> str | None:
    """The unprivileged user to run the server as when we are root, else None."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise PostgresUnavailable("running as root and neither user 'postgres' nor 'nobody' exists")


class PostgresServer:
    """A temporary PostgreSQL cluster: ``start()``, ``url(db)``, ``restart()``, ``stop()``."""

    def __init__(self, *, fsync: bool = True) -> None:
        self.bindir = find_bindir()
        self.user = _run_as()
        self.fsync = fsync
        self.base = tempfile.mkdtemp(prefix="otel-audit-pg-")
        self.data = os.path.join(self.base, "data")
        self.log = os.path.join(self.base, "server.log")
        self.port = 0
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.base, entry.pw_uid, entry.pw_gid)
        self._run(
            [
                "initdb", "-D", self.data, "-U", SUPERUSER, "-E", "UTF8", "--locale=C",
                "--auth=trust", "--no-instructions",
            ]
        )  # fmt: skip

    def _run(self, argv: list[str], timeout: float = 120) -> str:
        argv = [os.path.join(self.bindir, argv[0]), *argv[1:]]
        if self.user is not None:
            argv = ["runuser", "-u", self.user, "--", *argv]
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, cwd=self.base, check=False
        )
        if proc.returncode != 0:
            raise PostgresUnavailable(
                f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}"
                f"{self._log_tail()}"
            )
        return proc.stdout

    def _log_tail(self) -> str:
        try:
            with open(self.log, encoding="utf-8", errors="replace") as fh:
                return "\nserver log:\n" + "".join(fh.readlines()[-20:])
        except OSError:
            return ""

    def _options(self) -> str:
        fsync = "on" if self.fsync else "off"
        return (
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1"
            f" -c fsync={fsync} -c synchronous_commit=on -c max_connections=200"
        )

    def start(self) -> PostgresServer:
        """Start on a free port (retrying when another process took it first).

        After ``stop()`` it starts again on the same port, so URLs stay valid.
        """
        if self.port:
            self._run(["pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60",
                       "-o", self._options(), "start"])  # fmt: skip
            return self
        for attempt in range(5):
            self.port = _free_port()
            try:
                self._run(["pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60",
                           "-o", self._options(), "start"])  # fmt: skip
                return self
            except PostgresUnavailable:
                self.port = 0
                if attempt == 4:
                    raise
        return self

    def stop(self) -> None:
        """Stop immediately-but-cleanly (fast mode: disconnects clients, flushes)."""
        self._run(["pg_ctl", "-D", self.data, "-w", "-t", "60", "-m", "fast", "stop"])

    def restart(self, mode: str = "fast") -> None:
        """Stop and start again on the same port: every client connection breaks.

        ``mode`` is pg_ctl's shutdown mode; ``immediate`` is a crash (no
        shutdown checkpoint), so the restart replays the WAL.
        """
        self._run(["pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60", "-m", mode,
                   "-o", self._options(), "restart"])  # fmt: skip

    def close(self) -> None:
        """Stop the server if it runs and delete its directory."""
        try:
            self.stop()
        except PostgresUnavailable:
            pass  # already stopped
        shutil.rmtree(self.base, ignore_errors=True)

    def url(self, dbname: str = "postgres", user: str = SUPERUSER) -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """Create database ``name`` (a plain identifier) and return its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def wait_ready(self, deadline: float = 60.0) -> None:
        """Poll until the server accepts connections (after an external restart)."""
        import psycopg

        end = time.monotonic() + deadline
        while True:
            try:
                with psycopg.connect(self.url(), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
