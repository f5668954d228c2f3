"""The example shop's inventory service (source: otel_audit/_demo/inventory.py).

    OTEL_AUDIT_LEDGER=sqlite:///audit.db OTEL_SERVICE_NAME=inventory \
    OTEL_AUDIT_TRUSTED_PEERS=127.0.0.1/32 \
    opentelemetry-instrument flask --app inventory run --port 5002
"""

from otel_audit._demo.inventory import ROUTES, app

__all__ = ["ROUTES", "app"]
