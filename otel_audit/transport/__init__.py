"""Transport: OTLP decoding, the durable receiver (serve), the forwarder, checkpoint anchors."""
