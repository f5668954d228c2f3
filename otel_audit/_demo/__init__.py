"""The example shop (orders + inventory), shipped in the package so ``otel-audit demo``
works right after ``pip install``; ``examples/`` documents how to run it by hand.

The services contain no audit code: they are audited by running them under
``opentelemetry-instrument`` with ``OTEL_AUDIT_LEDGER`` set. Only the two
things no instrumentation can see are marked with ``otel_audit.semantics.effects``:
the notification sent to the user and the background job's actor.
"""
