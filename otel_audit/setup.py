"""One-call setup: ``configure(ledger=..., service_name=..., **options)``.

Installs an AuditSpanProcessor (and wraps the sampler in an AuditSampler) on
an SDK TracerProvider: the one passed, else the global one, else a new one
that becomes global. Existing processors and exporters keep working.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import _get_from_env_or_default

from otel_audit import settings
from otel_audit.capture import installed
from otel_audit.capture.actions import AuditAction
from otel_audit.capture.installed import refuse_actions
from otel_audit.capture.processor import AuditSpanProcessor
from otel_audit.capture.sampler import AuditSampler
from otel_audit.engine.ledger import open_ledger
from otel_audit.engine.remote import ProcessWriter
from otel_audit.engine.writer import LedgerWriter, WriterStats
from otel_audit.errors import ConfigError
from otel_audit.proof.keys import Signer
from otel_audit.sigterm import handle_sigterm
from otel_audit.vocabulary import DEFAULT_KEPT_EFFECTS

_log = logging.getLogger("otel_audit")

__all__ = ["AuditPipeline", "configure", "install_sampler", "refuse_actions"]

_OPTIONS = frozenset(
    {
        "tracer_provider",
        "durability",
        "signing_key",
        "chain",
        "checkpoint_every",
        "checkpoint_interval",
        "max_queue_size",
        "effects",
        "install_sampler",
        "handle_sigterm",
        "meter_provider",
        "policy",
        "writer",
    }
)


class AuditPipeline:
    """What ``configure`` installed: processor, writer, provider. Thread-safe."""

    def __init__(
        self,
        provider: TracerProvider,
        processor: AuditSpanProcessor,
        writer: LedgerWriter | ProcessWriter,
    ) -> None:
        self.provider = provider
        self.processor = processor
        self.writer = writer
        self.tracer = provider.get_tracer("otel_audit")

    def check(self) -> None:
        """Raise LedgerUnavailable when this pipeline cannot record an action now."""
        self.writer.check()

    @property
    def ledger_url(self) -> str:
        return self.writer.url

    @property
    def chain(self) -> str:
        return self.writer.chain

    def stats(self) -> WriterStats:
        return self.writer.stats()

    def flush(self, timeout: float | None = 30.0) -> bool:
        return self.writer.flush(timeout)

    def audit_action(self, action: str, **options: Any) -> AuditAction:
        """``audit_action`` bound to this pipeline (for processes with several providers)."""
        return AuditAction(action, pipeline=self, tracer=self.tracer, **options)

    def shutdown(self) -> None:
        """Commit everything queued, write the final checkpoint, stop the writer.

        The pipeline stays installed until the writer has stopped: new actions
        find it and are refused (fail closed) instead of running unaudited and
        feeding a flush that, under load, would never see an empty queue.
        """
        try:
            self.writer.shutdown()
        finally:
            installed.uninstall(self.provider, self)


def _provider(given: Any, service_name: str | None) -> TracerProvider:
    provider = given if given is not None else trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        return provider
    if given is not None:
        raise ConfigError("tracer_provider must be an opentelemetry.sdk.trace.TracerProvider")
    if isinstance(provider, trace.ProxyTracerProvider):
        attrs = {SERVICE_NAME: service_name} if service_name else {}
        created = TracerProvider(resource=Resource.create(attrs))
        trace.set_tracer_provider(created)
        return created
    raise ConfigError(
        f"the global tracer provider is a {type(provider).__name__}, not an SDK TracerProvider"
    )


def install_sampler(provider: TracerProvider) -> AuditSampler:
    """Wrap ``provider``'s sampler in an AuditSampler (once), for new and existing tracers."""
    current = provider.sampler
    if isinstance(current, AuditSampler):
        return current
    sampler = AuditSampler(current or _get_from_env_or_default())
    provider.sampler = sampler
    # Tracers copy the sampler when created; update those made before us.
    for tracer in list(getattr(provider, "_tracers", {}).values()):
        if hasattr(tracer, "sampler"):
            tracer.sampler = sampler
    return sampler


def _register_metrics(pipeline: AuditPipeline, meter_provider: Any = None) -> None:
    if meter_provider is not None:
        meter = meter_provider.get_meter("otel_audit")
    else:
        meter = metrics.get_meter("otel_audit")
    writer = pipeline.writer

    def observe(field: str) -> Any:
        def callback(_options: Any) -> Any:
            yield metrics.Observation(getattr(writer.stats(), field), {"chain": writer.chain})

        return callback

    meter.create_observable_gauge(
        "otel_audit.queue.depth", [observe("queue_depth")], unit="{record}",
        description="Audit records queued and not yet committed",
    )  # fmt: skip
    meter.create_observable_counter(
        "otel_audit.records.committed", [observe("committed")], unit="{record}",
        description="Audit records committed to the ledger",
    )  # fmt: skip
    meter.create_observable_counter(
        "otel_audit.records.failed", [observe("failed")], unit="{record}",
        description="Audit records that could not be committed",
    )  # fmt: skip
    histogram = meter.create_histogram(
        "otel_audit.commit.duration", unit="s", description="Duration of one group commit"
    )
    writer.commit_listeners.append(
        lambda seconds, _n: histogram.record(seconds, {"chain": writer.chain})
    )


def _policy_source(spec: Any) -> str | None:
    """The policy file a writer process loads, so it redacts as this process would.

    None: the defaults (the worker reads the same ``OTEL_AUDIT_*`` variables).
    """
    if spec is None:
        return None
    if isinstance(spec, (str, os.PathLike)):
        return os.path.abspath(os.fspath(spec))
    raise ConfigError(
        "writer='process' needs the policy as a file (policy=path or OTEL_AUDIT_POLICY):"
        " the writer process loads the same file; a policy object cannot be sent to it"
    )


def configure(
    ledger: str | None = None, service_name: str | None = None, **options: Any
) -> AuditPipeline:
    """Install the audit pipeline; returns it. Raises ConfigError on a bad setting.

    Options: ``tracer_provider``, ``durability`` (sync|async), ``signing_key``
    (path), ``chain``, ``checkpoint_every``, ``checkpoint_interval`` (seconds),
    ``max_queue_size``, ``effects`` (kept effects), ``install_sampler``
    (default True), ``handle_sigterm`` (default True), ``meter_provider``
    (default: the global one), ``policy`` (a file path or an
    ``otel_audit.policy.rules.AuditPolicy``; see docs/policy.md). Each falls back to its
    ``OTEL_AUDIT_*`` variable, then a default.
    """
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise ConfigError(f"configure() got unknown option {unknown[0]!r}")
    conf = settings.load(
        ledger=ledger,
        durability=options.get("durability"),
        signing_key=options.get("signing_key"),
        chain=options.get("chain"),
        checkpoint_every=options.get("checkpoint_every"),
        checkpoint_interval=options.get("checkpoint_interval"),
        max_queue_size=options.get("max_queue_size"),
        effects=options.get("effects"),
        writer=options.get("writer"),
    )
    # Always a policy: with no file the default redaction still runs (docs/design.md, rule 4).
    # Loaded before the ledger is opened so a bad file leaves nothing half-built.
    from otel_audit.policy.boundary import install_propagator
    from otel_audit.policy.rules import load_policy

    policy = load_policy(options.get("policy"))
    signer = Signer.from_file(conf.signing_key) if conf.signing_key else None
    provider = _provider(options.get("tracer_provider"), service_name)
    if installed.installed_on(provider) is not None:
        # A second processor would write every record twice.
        raise ConfigError(
            "an audit pipeline is already installed on this tracer provider"
            " (configure() called twice, or also by opentelemetry-instrument);"
            " call shutdown() on the first one before configuring again"
        )
    service = service_name or str(
        provider.resource.attributes.get(SERVICE_NAME) or "unknown_service"
    )
    ledger_obj = open_ledger(conf.ledger)
    chain = conf.chain or getattr(ledger_obj, "default_chain", lambda s: s)(service)
    writer: LedgerWriter | ProcessWriter
    if conf.writer == "process":
        ledger_obj.close()  # the worker opens its own
        writer = ProcessWriter(
            conf.ledger,
            chain,
            service=service,
            policy=_policy_source(options.get("policy")),
            signing_key=conf.signing_key,
            max_queue_size=conf.max_queue_size,
            checkpoint_every=conf.checkpoint_every,
            checkpoint_interval=conf.checkpoint_interval,
        )
    else:
        writer = LedgerWriter(
            conf.ledger,
            chain,
            max_queue_size=conf.max_queue_size,
            checkpoint_every=conf.checkpoint_every,
            checkpoint_interval=conf.checkpoint_interval,
            signer=signer,
            ledger=ledger_obj,
        )
    processor = AuditSpanProcessor(
        writer,
        service,
        durability=conf.durability,
        effects=policy.effects(conf.effects if conf.effects is not None else DEFAULT_KEPT_EFFECTS),
        policy=policy,
    )
    boundary = policy.boundary_processor(service, provider, options.get("meter_provider"))
    if boundary is not None:
        provider.add_span_processor(boundary)  # before the audit processor: it stamps first
        install_propagator()
    provider.add_span_processor(processor)
    if options.get("install_sampler", True):
        install_sampler(provider)
    pipeline = AuditPipeline(provider, processor, writer)
    _register_metrics(pipeline, options.get("meter_provider"))
    installed.install(provider, pipeline)
    installed.refuse_actions(None)  # a pipeline now records what is audited
    if options.get("handle_sigterm", True):
        handle_sigterm(pipeline)
    from otel_audit.transport.anchors import install_anchor_logging
    from otel_audit.transport.forward import start_forwarder_from_env

    install_anchor_logging(pipeline)  # checkpoints also go to the log backend (anchors)
    start_forwarder_from_env(pipeline)  # no-op unless OTEL_AUDIT_FORWARD_ENDPOINT is set
    return pipeline
