"""Integrations: Flask and zero-code auto-instrumentation."""
