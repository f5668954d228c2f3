"""``otel-audit serve``: receive OTLP traces and commit the audit spans to a ledger."""

from __future__ import annotations

import argparse
import os
import sys

from otel_audit._commands._common import (
    add_ledger_argument,
    ledger_url,
    termination_signals,
    wait_until,
)
from otel_audit.errors import ConfigError
from otel_audit.proof.keys import Signer
from otel_audit.settings import (
    OTEL_AUDIT_CHAIN,
    OTEL_AUDIT_EFFECTS,
    OTEL_AUDIT_SERVE_TOKEN,
    OTEL_AUDIT_SIGNING_KEY,
)
from otel_audit.settings import load as load_settings
from otel_audit.transport.serve import (
    DEFAULT_GRPC_ADDRESS,
    DEFAULT_HTTP_ADDRESS,
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_REQUEST_SIZE,
    AuditServer,
    parse_address,
)

#: The bearer token clients must send; read from the environment or a file so
#: that it never appears in a process listing.


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "serve",
        help="durable OTLP receiver: commit received audit spans to a ledger",
        description="Receive OTLP traces over HTTP and gRPC and commit the audit spans to "
        "a ledger; a request succeeds only after its spans are committed.",
    )
    add_ledger_argument(p)
    p.add_argument(
        "--listen", metavar="HOST:PORT", default="{}:{}".format(*DEFAULT_HTTP_ADDRESS),
        help="OTLP/HTTP address (default %(default)s); 'off' disables it",
    )  # fmt: skip
    p.add_argument(
        "--grpc-listen", metavar="HOST:PORT", default="{}:{}".format(*DEFAULT_GRPC_ADDRESS),
        help="OTLP/gRPC address (default %(default)s); 'off' disables it",
    )  # fmt: skip
    p.add_argument("--all", action="store_true", help="store every span, not only audit spans")
    p.add_argument(
        "--effects",
        metavar="LIST",
        help="effects kept for trail spans that do not say theirs (default "
        f"${OTEL_AUDIT_EFFECTS}, else data.write,http.call,message.publish,notification); "
        "a span carrying audit.effect is kept as its sender decided",
    )
    p.add_argument(
        "--chain", help=f"chain to append to (default ${OTEL_AUDIT_CHAIN}, else 'otel-audit-serve')"
    )
    p.add_argument(
        "--token-file", metavar="PATH",
        help=f"require 'Authorization: Bearer <token>' with the token in PATH (or ${OTEL_AUDIT_SERVE_TOKEN})",
    )  # fmt: skip
    p.add_argument("--tls-cert", metavar="PATH", help="PEM certificate chain: serve TLS")
    p.add_argument("--tls-key", metavar="PATH", help="PEM private key of --tls-cert")
    p.add_argument(
        "--max-request-size", metavar="BYTES", type=int, default=DEFAULT_MAX_REQUEST_SIZE,
        help="largest request body, compressed or not (default %(default)s); larger gets 413",
    )  # fmt: skip
    p.add_argument(
        "--max-pending", metavar="N", type=int, default=DEFAULT_MAX_PENDING,
        help="records waiting for commit above which clients are told to retry (default %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--signing-key",
        metavar="PATH",
        help=f"Ed25519 key signing checkpoints (default ${OTEL_AUDIT_SIGNING_KEY})",
    )
    p.add_argument(
        "--checkpoint-every",
        metavar="N",
        type=int,
        default=1000,
        help="records per checkpoint (default %(default)s)",
    )
    p.add_argument(
        "--checkpoint-interval",
        metavar="SECONDS",
        type=float,
        default=10.0,
        help="seconds between checkpoints (default %(default)s)",
    )
    p.set_defaults(func=run)


def _address(value: str, default: tuple[str, int], what: str) -> tuple[str, int] | None:
    if value.strip().lower() == "off":
        return None
    return parse_address(value, default[1], what)


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            raise ConfigError(
                f"cannot read --token-file {args.token_file!r}: {exc.strerror}"
            ) from None
        if not token:
            raise ConfigError(f"--token-file {args.token_file!r} is empty")
        return token
    return os.environ.get(OTEL_AUDIT_SERVE_TOKEN, "").strip() or None


def _effects(value: str | None) -> frozenset[str] | None:
    """--effects, else OTEL_AUDIT_EFFECTS, validated by the settings module; None: the default."""
    env = (
        {OTEL_AUDIT_EFFECTS: os.environ[OTEL_AUDIT_EFFECTS]}
        if OTEL_AUDIT_EFFECTS in os.environ
        else {}
    )
    try:
        return load_settings(effects=value, env=env).effects
    except ConfigError as exc:
        if value is None:
            raise
        raise ConfigError(f"--effects {value!r}: {exc}") from None


def run(args: argparse.Namespace) -> int:
    for name in ("max_request_size", "max_pending", "checkpoint_every"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer")
    if not args.checkpoint_interval > 0:
        raise ConfigError("--checkpoint-interval must be a positive number")
    http = _address(args.listen, DEFAULT_HTTP_ADDRESS, "--listen")
    grpc = _address(args.grpc_listen, DEFAULT_GRPC_ADDRESS, "--grpc-listen")
    key = args.signing_key or os.environ.get(OTEL_AUDIT_SIGNING_KEY)
    signer = Signer.from_file(key) if key else None
    server = AuditServer(
        ledger_url(args),
        http_address=http,
        grpc_address=grpc,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        chain=args.chain or os.environ.get(OTEL_AUDIT_CHAIN) or None,
        keep_all=args.all,
        effects=_effects(args.effects),
        token=_token(args),
        max_request_size=args.max_request_size,
        max_pending=args.max_pending,
        signer=signer,
        checkpoint_every=args.checkpoint_every,
        checkpoint_interval=args.checkpoint_interval,
    )
    with termination_signals() as stop:
        try:
            server.start()
            scheme = "https" if args.tls_cert else "http"
            parts = []
            if server.http_address:
                host, port = server.http_address
                parts.append(f"otlp/http on {scheme}://{host}:{port}/v1/traces")
            if server.grpc_address:
                host, port = server.grpc_address
                parts.append(f"otlp/grpc on {host}:{port}")
            print(
                f"otel-audit serve: {', '.join(parts)}, chain {server.receiver.chain!r}",
                flush=True,
            )
            wait_until(stop)
        finally:
            server.stop()
    stats = server.stats()
    print(
        f"otel-audit serve: stopped; {stats.committed} records committed "
        f"({stats.requests} requests, {stats.commits} transactions), "
        f"{stats.duplicates} duplicates skipped, {stats.rejected} rejected",
        file=sys.stderr,
    )
    return 0
