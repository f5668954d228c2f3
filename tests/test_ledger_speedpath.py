"""The ledger's fast paths keep the contract: keyed dedupe, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import pytest

from otel_audit.engine.ledger.base import span_key, span_keys
from otel_audit.engine.record import Record, encode


def rec(i: int, **attrs: object) -> bytes:
    return encode(
        Record(
            trace_id=f"{i:032x}",
            span_id=f"{i:016x}",
            parent_span_id=None,
            name="op",
            kind="INTERNAL",
            service="shop",
            start=1_700_000_000_000_000_000 + i,
            end=1_700_000_000_000_000_001 + i,
            attributes=dict(attrs),
        )
    )


def key(i: int) -> tuple[str, str]:
    return f"{i:032x}", f"{i:016x}"


def test_span_key_parses_what_the_standard_parser_reads():
    assert span_key(rec(7)) == key(7)
    # orjson refuses NaN and lone surrogates; the standard parser reads them.
    body = b'{"trace_id":"ab","span_id":"cd","x":NaN,"y":"\\ud800"}'
    assert span_key(body) == ("ab", "cd")
    assert span_key(b"not json") is None
    assert span_key(b"[1, 2]") is None
    assert span_key(b'{"trace_id":"ab"}') is None


def test_given_keys_are_used_only_where_the_body_holds_them():
    bodies = [rec(1), rec(2), rec(3)]
    assert span_keys(bodies, [key(1), key(2), key(3)]) == [key(1), key(2), key(3)]
    # Misaligned or missing keys never stand for another body: those are parsed.
    assert span_keys(bodies, [key(2), None, key(9)]) == [key(1), key(2), key(3)]
    # A count that does not match: every body is parsed.
    assert span_keys(bodies, [key(1)]) == [key(1), key(2), key(3)]
    assert span_keys(bodies, None) == [key(1), key(2), key(3)]


def test_attributes_named_like_the_ids_do_not_pass_for_them():
    # An attribute called span_id / trace_id (sorted before the record's own
    # fields) carrying another span's ids: the key check reads the record's own.
    body = rec(1, span_id=key(2)[1], trace_id=key(2)[0], start=5)
    assert span_keys([body], [key(2)]) == [key(1)]
    assert span_keys([body], [key(1)]) == [key(1)]
    # Ids that are not plain hex are left to the parser.
    odd = encode(
        Record(
            trace_id='a"b',
            span_id="c\\d",
            parent_span_id=None,
            name="op",
            kind="INTERNAL",
            service="shop",
            start=1,
            end=2,
        )
    )
    assert span_keys([odd], [('a"b', "c\\d")]) == [('a"b', "c\\d")]


def test_keyed_dedupe_skips_stored_and_repeated_spans(make_ledger, ledger_kind):
    ledger = make_ledger(ledger_kind)
    ledger.append("a", [rec(1), rec(2)])
    bodies = [rec(2), rec(3), rec(3), rec(4)]
    got = ledger.append("b", bodies, dedupe=True, keys=[key(2), key(3), key(3), key(4)])
    assert [(x.chain, x.seq) for x in got] == [("b", 1), ("b", 2)]
    assert [r.body for r in ledger.scan("b")] == [rec(3), rec(4)]
    # Wrong keys (another span's, or one already stored) cannot make a new span look stored.
    got = ledger.append("b", [rec(5), rec(6)], dedupe=True, keys=[key(1), key(2)])
    assert [x.seq for x in got] == [3, 4]
    assert ledger.count() == 6


def test_serve_passes_the_keys_it_built(tmp_path, monkeypatch):
    """The receiver hands each record's ids to the ledger: no body is parsed again."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from otel_audit.engine.ledger import base
    from otel_audit.transport.receive import AuditReceiver

    provider = TracerProvider(shutdown_on_exit=False)
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("t")
    for i in range(20):
        with tracer.start_as_current_span("op", attributes={"audit.event": True, "n": i}):
            pass
    body = encode_spans(memory.get_finished_spans()).SerializeToString()
    parsed: list[bytes] = []
    real = base.span_key

    def counting(raw: bytes) -> object:
        parsed.append(raw)
        return real(raw)

    monkeypatch.setattr(base, "span_key", counting)
    receiver = AuditReceiver(f"sqlite:///{tmp_path / 'serve.db'}")
    try:
        assert receiver.export(body) == []
        assert receiver.export(body) == []  # the retry: stored once
        stats = receiver.stats()
        assert (stats.committed, stats.duplicates) == (20, 20)
    finally:
        receiver.close()
    assert parsed == []
    assert receiver._appends._keys == {}


@pytest.mark.parametrize("fail_after", [0, 3])
def test_keys_of_bodies_that_were_never_queued_are_forgotten(tmp_path, fail_after):
    from otel_audit.errors import LedgerUnavailable
    from otel_audit.transport.receive import AuditReceiver, Unavailable

    receiver = AuditReceiver(f"sqlite:///{tmp_path / 'serve.db'}")
    try:
        real = receiver.writer.enqueue
        calls = []

        def enqueue(body: bytes) -> object:
            calls.append(body)
            if len(calls) > fail_after:
                raise LedgerUnavailable("shut down")
            return real(body)

        receiver.writer.enqueue = enqueue  # type: ignore[method-assign]
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        provider = TracerProvider(shutdown_on_exit=False)
        memory = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(memory))
        tracer = provider.get_tracer("t")
        for i in range(6):
            with tracer.start_as_current_span("op", attributes={"audit.event": True, "n": i}):
                pass
        body = encode_spans(memory.get_finished_spans()).SerializeToString()
        with pytest.raises(Unavailable):
            receiver.submit(body)
        receiver.writer.flush(10)
        assert receiver._appends._keys == {}
    finally:
        receiver.close()


def test_binary_copy_stores_bytes_exactly(make_ledger, ledger_kind):
    """Chain names in any script and bodies of any size and byte come back as written."""
    ledger = make_ledger(ledger_kind)
    chain = "shöp/ȟost/\u2603/1"
    bodies = [rec(1), rec(2, blob="x" * 70_000), rec(3, text='a\x00b\u2603\\"')]
    appended = ledger.append(chain, bodies)
    assert [r.body for r in ledger.scan(chain)] == bodies
    assert ledger.head(chain) == appended[-1]
    assert chain in ledger.chains()
    # The next append continues the chain from the remembered head.
    more = ledger.append(chain, [rec(4)])
    assert more[0].seq == 4
    rows = list(ledger.scan(chain))
    assert rows[3].prev_hash == appended[-1].hash
