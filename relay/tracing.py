"""The relay's part of a transfer's trace: one PRODUCER span per published message, continuing the
trace context stored on its outbox row, and the message headers that carry it on to the worker.

Following OpenTelemetry's messaging conventions, a span named `send <queue>` (kind PRODUCER) per
message, child of the row's `traceparent`; the message's `traceparent` header names that span, so the
worker's CONSUMER span is its child. When the tracer provider exports nothing (no OTLP endpoint, or
OTEL_SDK_DISABLED), no span is made at all: the row's own `traceparent` goes into the header as it
is, so the trace id still reaches the worker and its logs, and the relay pays one dict per message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from core.outbox.queries import OutboxRow
from core.telemetry import context_from_traceparent, is_exporting

# Message headers the relay sets (the worker reads them: worker.observability).
TRACEPARENT_HEADER = "traceparent"
CREATED_AT_HEADER = "outbox_created_at"  # the row's commit, seconds since the epoch


def message_headers(row: OutboxRow, traceparent: str | None) -> dict[str, Any]:
    """The custom headers of a row's message: its trace context and the commit time of the row."""
    headers: dict[str, Any] = {}
    if traceparent:
        headers[TRACEPARENT_HEADER] = traceparent
    if row.created_at is not None:
        headers[CREATED_AT_HEADER] = row.created_at.timestamp()
    return headers


def _traceparent(span: Span) -> str | None:
    context = span.get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


class PublishTracer:
    """Makes the publish spans of a batch, when tracing exports anything."""

    def __init__(self, queue: str, provider: trace.TracerProvider | None = None) -> None:
        provider = provider or trace.get_tracer_provider()
        self.enabled = is_exporting(provider)
        self._tracer = provider.get_tracer("relay")
        self._name = f"send {queue}"
        self._queue = queue

    def start(self, rows: Sequence[OutboxRow]) -> tuple[list[Span | None], list[dict[str, Any]]]:
        """One span per row (None each when disabled), and the headers of each row's message."""
        if not self.enabled:
            return [None] * len(rows), [message_headers(row, row.traceparent) for row in rows]
        spans: list[Span | None] = []
        headers = []
        for row in rows:
            span = self._tracer.start_span(
                self._name, context=context_from_traceparent(row.traceparent), kind=SpanKind.PRODUCER
            )
            if span.is_recording():
                span.set_attributes(
                    {
                        "messaging.system": "celery",
                        "messaging.operation.type": "send",
                        "messaging.operation.name": "send",
                        "messaging.destination.name": self._queue,
                        "messaging.message.id": str(row.id),
                        "celery.task_name": row.task_name,
                    }
                )
            spans.append(span)
            headers.append(message_headers(row, _traceparent(span) or row.traceparent))
        return spans, headers

    @staticmethod
    def end(spans: Sequence[Span | None], outcomes: Sequence[object]) -> None:
        """End each span with its row's outcome (None: the broker accepted it)."""
        for span, outcome in zip(spans, outcomes, strict=True):
            if span is None:
                continue
            if outcome is not None:
                span.set_status(Status(StatusCode.ERROR, str(getattr(outcome, "error", outcome))))
            span.end()
