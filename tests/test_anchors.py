"""Checkpoints as OpenTelemetry log records (anchors), and verify against them."""

from __future__ import annotations

import json
import sqlite3

import pytest
from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor

from otel_audit import vocabulary as v
from otel_audit.cli import main
from otel_audit.engine.ledger import open_ledger
from otel_audit.engine.record import decode, encode
from otel_audit.errors import ConfigError
from otel_audit.proof.chain import link_hash
from otel_audit.transport.anchors import (
    CHAIN,
    EVENT_NAME,
    HEAD,
    SEQ,
    checkpoint_attributes,
    install_anchor_logging,
    read_anchors,
)


@pytest.fixture
def anchored(make_pipeline, otlp_sink, tmp_path):
    """A pipeline whose checkpoints went to a real OTLP log receiver; (pipeline, sink, jsonl path)."""
    logs = LoggerProvider()
    logs.add_log_record_processor(
        SimpleLogRecordProcessor(OTLPLogExporter(endpoint=f"{otlp_sink.endpoint}/v1/logs"))
    )
    pipeline, provider, _ = make_pipeline(checkpoint_every=2, signing_key=None)
    install_anchor_logging(pipeline, logs)
    tracer = provider.get_tracer("shop")
    for i in range(4):
        with tracer.start_as_current_span(
            f"order.update {i}", attributes={v.EVENT: True, v.ACTION: "order.update"}
        ):
            pass
    pipeline.flush()
    assert otlp_sink.wait_for(lambda s: len(s.requests["/v1/logs"]) >= 2)
    # The log backend's export: one OTLP/JSON ExportLogsServiceRequest per line
    # (what the Collector's file exporter writes).
    path = tmp_path / "anchors.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps({"resourceLogs": [], "note": "unrelated line"}) + "\n")
        f.writelines(
            json_format.MessageToJson(request, indent=None) + "\n"
            for request in otlp_sink.requests["/v1/logs"]
        )
    yield pipeline, otlp_sink, path
    logs.shutdown()


def test_checkpoints_are_emitted_as_log_records(anchored):
    pipeline, sink, _ = anchored
    with open_ledger(pipeline.ledger_url, create=False) as ledger:
        stored = ledger.checkpoints(pipeline.chain)
    assert [cp.seq for cp in stored] == [2, 4]
    records = [
        rec
        for req in sink.requests["/v1/logs"]
        for rl in req.resource_logs
        for sl in rl.scope_logs
        for rec in sl.log_records
    ]
    assert [r.event_name for r in records] == [EVENT_NAME, EVENT_NAME]
    attrs = [{a.key: json_format.MessageToDict(a.value) for a in r.attributes} for r in records]
    assert [a[SEQ] for a in attrs] == [{"intValue": "2"}, {"intValue": "4"}]
    assert [a[HEAD]["stringValue"] for a in attrs] == [cp.head.hex() for cp in stored]
    assert {a[CHAIN]["stringValue"] for a in attrs} == {pipeline.chain}
    assert "checkpoint" in records[0].body.string_value


def test_anchors_read_back_from_otlp_json_lines(anchored):
    pipeline, _, path = anchored
    with open_ledger(pipeline.ledger_url, create=False) as ledger:
        stored = ledger.checkpoints(pipeline.chain)
    assert read_anchors(path) == stored
    assert main(["verify", "--ledger", pipeline.ledger_url, "--anchors", str(path)]) == 0


def _rewrite_history(db_path, chain):
    """An insider's rewrite: change record 1, recompute every hash and checkpoint head."""
    con = sqlite3.connect(db_path, isolation_level=None)
    rows = con.execute(
        "SELECT seq, body FROM records WHERE chain = ? ORDER BY seq", (chain,)
    ).fetchall()
    prev = bytes(32)
    heads = {}
    con.execute("BEGIN")
    for seq, body in rows:
        if seq == 1:
            record = decode(body)
            record.attributes[v.ACTION] = "order.delete"
            body = encode(record)
        digest = link_hash(prev, body)
        con.execute(
            "UPDATE records SET body = ?, prev_hash = ?, hash = ? WHERE chain = ? AND seq = ?",
            (body, prev, digest, chain, seq),
        )
        heads[seq] = digest
        prev = digest
    for seq, digest in heads.items():
        # Merkle roots dropped too: without a public key nothing proves they were there.
        con.execute(
            "UPDATE checkpoints SET head = ?, merkle_root = NULL WHERE chain = ? AND seq = ?",
            (digest, chain, seq),
        )
    con.execute("COMMIT")
    con.close()


def test_anchors_catch_a_recomputed_history(anchored, capsys):
    pipeline, _, path = anchored
    db_path = pipeline.ledger_url[len("sqlite:///") :]
    pipeline.shutdown()
    _rewrite_history(db_path, pipeline.chain)
    # Without a key or anchors the rewrite is self-consistent...
    assert main(["verify", "--ledger", pipeline.ledger_url, "-q"]) == 0
    capsys.readouterr()
    # ...the anchors held by the log backend are not.
    assert main(["verify", "--ledger", pipeline.ledger_url, "--anchors", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "anchor at seq 2" in err and "history rewritten between seq 1 and 2" in err
    assert len(err.splitlines()) == 1


def test_flat_json_lines_are_accepted(tmp_path):
    from otel_audit.proof.chain import Checkpoint

    cp = Checkpoint(
        "shop",
        7,
        bytes(range(32)),
        123,
        signature=b"\x01" * 64,
        key_id="k1",
        merkle_root=b"\x02" * 32,
    )
    path = tmp_path / "flat.jsonl"
    lines = [
        {"attributes": checkpoint_attributes(cp), "body": "otel-audit checkpoint"},
        checkpoint_attributes(cp),
        {"message": "an ordinary log line"},
        {
            "attributes": [
                {
                    "key": k,
                    "value": {"intValue": str(val)}
                    if isinstance(val, int)
                    else {"stringValue": val},
                }
                for k, val in checkpoint_attributes(cp).items()
            ]
        },
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert read_anchors(path) == [cp, cp, cp]


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json\n", r"flat.jsonl:1: not JSON"),
        (
            json.dumps({CHAIN: "c", SEQ: 1, HEAD: "zz"}) + "\n",
            r"flat.jsonl:1: otel_audit.checkpoint.head 'zz' is not hex",
        ),
        (json.dumps({CHAIN: "c", SEQ: "x", HEAD: "00" * 32}) + "\n", r"is not an integer"),
        (json.dumps({CHAIN: "c", SEQ: 0, HEAD: "00" * 32}) + "\n", r"not a valid checkpoint"),
    ],
)
def test_bad_anchor_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "flat.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_anchors(path)


@pytest.mark.parametrize(
    "hostile, message",
    [
        ("[" * 200_000, "deep.jsonl:2: JSON nested too deeply"),
        ("1" * 5000, "deep.jsonl:2: not usable JSON"),
        (f'{{"{CHAIN}": "c", "{SEQ}": 1e999, "{HEAD}": "{"00" * 32}"}}', "deep.jsonl:2: "),
        (
            json.dumps({"attributes": [{"key": SEQ, "value": {"intValue": "x"}}]}),
            "deep.jsonl:2: not a usable log record",
        ),
    ],
)
def test_hostile_anchor_lines_are_one_line_errors(
    tmp_path, make_pipeline, capsys, hostile, message
):
    pipeline, _, _ = make_pipeline()
    pipeline.shutdown()
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps({"message": "fine"}) + "\n" + hostile + "\n")
    assert main(["verify", "--ledger", pipeline.ledger_url, "--anchors", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_verify_anchor_errors_exit_2(tmp_path, make_pipeline, capsys):
    pipeline, _, _ = make_pipeline()
    pipeline.shutdown()
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"message": "nothing here"}) + "\n")
    assert main(["verify", "--ledger", pipeline.ledger_url, "--anchors", str(empty)]) == 2
    assert "no checkpoint log records found" in capsys.readouterr().err
    assert (
        main(["verify", "--ledger", pipeline.ledger_url, "--anchors", str(tmp_path / "missing")])
        == 2
    )
    assert "cannot read anchors file" in capsys.readouterr().err


def test_serve_checkpoints_can_be_anchored(tmp_path, otlp_sink):
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    from otel_audit.transport.serve import AuditServer

    from .test_serve import _spans

    logs = LoggerProvider()
    logs.add_log_record_processor(
        SimpleLogRecordProcessor(OTLPLogExporter(endpoint=f"{otlp_sink.endpoint}/v1/logs"))
    )
    server = AuditServer(
        f"sqlite:///{tmp_path / 'served.db'}", http_address=("127.0.0.1", 0), grpc_address=None,
        checkpoint_every=3,
    ).start()  # fmt: skip
    install_anchor_logging(server.receiver, logs)
    host, port = server.http_address
    OTLPSpanExporter(endpoint=f"http://{host}:{port}/v1/traces").export(_spans(3, 0))
    assert otlp_sink.wait_for(lambda s: len(s.requests["/v1/logs"]) >= 1)
    server.stop()
    logs.shutdown()
    path = tmp_path / "a.jsonl"
    path.write_text(
        json_format.MessageToJson(otlp_sink.requests["/v1/logs"][0], indent=None) + "\n"
    )
    (anchor,) = read_anchors(path)
    assert (anchor.chain, anchor.seq) == ("otel-audit-serve", 3)
    assert (
        main(["verify", "--ledger", str(tmp_path / "served.db"), "--anchors", str(path), "-q"]) == 0
    )


def test_anchors_catch_a_truncated_ledger(anchored, capsys):
    pipeline, _, path = anchored
    db_path = pipeline.ledger_url[len("sqlite:///") :]
    pipeline.shutdown()
    con = sqlite3.connect(db_path, isolation_level=None)
    con.execute("DELETE FROM records WHERE seq > 2")
    con.execute("DELETE FROM checkpoints WHERE seq > 2")
    con.close()
    assert main(["verify", "--ledger", pipeline.ledger_url, "-q"]) == 0
    capsys.readouterr()
    assert main(["verify", "--ledger", pipeline.ledger_url, "--anchors", str(path)]) == 1
    assert (
        "truncated: records 3..4 are gone but the anchor at seq 4 covers them"
        in capsys.readouterr().err
    )
