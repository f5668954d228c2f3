"""The example shop's orders service (source: otel_audit/_demo/orders.py, shipped in the
package so ``otel-audit demo`` works after ``pip install``). No audit code here or there.

    OTEL_AUDIT_LEDGER=sqlite:///audit.db OTEL_SERVICE_NAME=orders \
    SHOP_INVENTORY_URL=http://127.0.0.1:5002 \
    opentelemetry-instrument flask --app orders run --port 5001
"""

from otel_audit._demo.orders import ROUTES, app

__all__ = ["ROUTES", "app"]
