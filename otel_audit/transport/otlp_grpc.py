"""OTLP/gRPC ``TraceService/Export`` in front of an ``AuditReceiver`` (grpcio)."""

from __future__ import annotations

from typing import Any

from otel_audit.errors import AuditError
from otel_audit.transport.otlp import MalformedRequest, response_bytes
from otel_audit.transport.receive import RETRY_AFTER_SECONDS, AuditReceiver

GRPC_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"


def grpc_handler(receiver: AuditReceiver) -> Any:
    """A generic handler for grpc.server: raw bytes in, so a malformed body is ours to answer."""
    import grpc  # type: ignore[import-untyped]
    from google.protobuf.duration_pb2 import Duration  # type: ignore[import-untyped]
    from google.rpc.error_details_pb2 import RetryInfo  # type: ignore[import-untyped]

    retry_info = RetryInfo(retry_delay=Duration(seconds=RETRY_AFTER_SECONDS)).SerializeToString()

    def export(request: bytes, context: Any) -> bytes:
        metadata = dict(context.invocation_metadata() or ())
        if not receiver.authorized(metadata.get("authorization")):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        if len(request) > receiver.max_request_size:
            # INVALID_ARGUMENT, not RESOURCE_EXHAUSTED: clients retry the latter.
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request of {len(request)} bytes exceeds the limit of {receiver.max_request_size} bytes",
            )
        try:
            rejected = receiver.export(request)
        except MalformedRequest as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except AuditError as exc:  # Overloaded, Unavailable: retryable
            context.set_trailing_metadata((("google.rpc.retryinfo-bin", retry_info),))
            context.abort(grpc.StatusCode.UNAVAILABLE, f"retry later: {exc}")
        return response_bytes(rejected)

    # request_deserializer=None: the method is the generated TraceService/Export
    # of opentelemetry-proto, but INVALID_ARGUMENT for a bad body is ours, not
    # the framework's INTERNAL.
    return grpc.method_handlers_generic_handler(
        GRPC_SERVICE,
        {"Export": grpc.unary_unary_rpc_method_handler(export)},
    )
