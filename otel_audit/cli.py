"""The ``otel-audit`` command line.

Each subcommand lives in its own module under ``otel_audit/_commands`` and
exposes ``register(subparsers)``; this module finds them, parses arguments and
maps errors to exit codes in one place: 0 ok, 1 damaged or failed, 2 usage or
an unreadable ledger. A user error is one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from collections.abc import Sequence

from otel_audit import _commands
from otel_audit.errors import AuditError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, like every other user error; the usage is one --help away.
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="otel-audit", description="Audit trails for OpenTelemetry.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for info in sorted(pkgutil.iter_modules(_commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{_commands.__name__}.{info.name}")
        module.register(sub)
    return parser


def _version() -> str:
    from otel_audit import __version__

    return f"otel-audit {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except AuditError as exc:
        print(f"otel-audit: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("otel-audit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (| head): not an error; keep Python from
        # complaining again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
