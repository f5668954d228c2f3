"""One module per ``otel-audit`` subcommand, each with ``register(subparsers)``."""
