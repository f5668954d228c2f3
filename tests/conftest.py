"""Shared test fixtures. Fixture plugins for real servers live in tests/plugins/."""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Callable, Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_audit
from otel_audit.setup import AuditPipeline

_HERE = pathlib.Path(__file__).parent
pytest_plugins = sorted(
    f"tests.plugins.{p.stem}" for p in (_HERE / "plugins").glob("*.py") if p.stem != "__init__"
)
sys.path.insert(0, str(_HERE.parent))


@pytest.fixture
def ledger_path(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "audit.db"


@pytest.fixture
def make_pipeline(
    tmp_path: pathlib.Path,
) -> Iterator[Callable[..., tuple[AuditPipeline, TracerProvider, InMemorySpanExporter]]]:
    """Factory: a real SDK TracerProvider with an in-memory normal exporter and an audit pipeline."""
    made: list[tuple[AuditPipeline, TracerProvider]] = []

    def make(
        ledger: str | None = None, service_name: str = "shop", sampler=None, **options
    ) -> tuple[AuditPipeline, TracerProvider, InMemorySpanExporter]:
        provider = TracerProvider(sampler=sampler, shutdown_on_exit=False)
        exporter = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        options.setdefault("handle_sigterm", False)
        pipeline = otel_audit.configure(
            ledger=ledger or f"sqlite:///{tmp_path / 'audit.db'}",
            service_name=service_name,
            tracer_provider=provider,
            **options,
        )
        made.append((pipeline, provider))
        return pipeline, provider, exporter

    yield make
    for pipeline, provider in made:
        pipeline.shutdown()
        provider.shutdown()
