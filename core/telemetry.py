"""OpenTelemetry tracing for the three processes, configured by the standard OTEL_* variables.

One trace follows a transfer: the API's request span, the relay's publish, the worker's task.
Between processes the trace travels as a W3C `traceparent` string (stored on the outbox row, then
carried in the Celery message headers): `current_traceparent()` writes it, and
`context_from_traceparent()` reads it back.

What the environment decides (read once per process, by `configure_tracing`):
- `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` set: spans are sampled by
  `OTEL_TRACES_SAMPLER` (default `parentbased_always_on`) and exported over OTLP
  (`OTEL_EXPORTER_OTLP_PROTOCOL`: `http/protobuf`, the default, or `grpc` with its extra package
  installed), batched (`OTEL_BSP_*`). The exporter reads its own variables (headers, timeout...).
- No endpoint: nothing is recorded or exported, unless the caller's `traceparent` says its trace is
  sampled. Trace and span ids are still made and propagated, so logs carry `trace_id` and one id
  still joins a transfer's log lines across the processes. The cost is an id and a context switch.
- `OTEL_TRACES_EXPORTER`: `otlp` (default), `console` (spans printed to stdout, for debugging) or
  `none`. `OTEL_SDK_DISABLED=true`: no tracing at all, not even ids.
- `OTEL_SERVICE_NAME` (or `service.name` in `OTEL_RESOURCE_ATTRIBUTES`) overrides the process's
  default service name.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
from opentelemetry.trace import format_span_id, format_trace_id
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

# The default service name of each process (OTEL_SERVICE_NAME overrides it).
API_SERVICE = "outbox-api"
RELAY_SERVICE = "outbox-relay"
WORKER_SERVICE = "outbox-worker"

_PROPAGATOR = TraceContextTextMapPropagator()
_EXPORTERS = {"otlp", "console", "none"}
_PROTOCOLS = {"http/protobuf", "grpc"}

_lock = threading.Lock()
_configured: trace.TracerProvider | None = None


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def _resource(default_service_name: str) -> Resource:
    """OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME, with the process's own name when neither names one."""
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: default_service_name}))
    return resource


def _otlp_exporter() -> SpanExporter:
    variable = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL" if _env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") else None
    variable = variable or "OTEL_EXPORTER_OTLP_PROTOCOL"
    protocol = _env(variable) or "http/protobuf"
    if protocol not in _PROTOCOLS:
        raise ValueError(f"{variable}={protocol!r}: use http/protobuf or grpc")
    transport = "http" if protocol == "http/protobuf" else "grpc"
    try:
        module: Any = importlib.import_module(f"opentelemetry.exporter.otlp.proto.{transport}.trace_exporter")
    except ImportError as exc:
        raise RuntimeError(f"{variable}=grpc needs `pip install opentelemetry-exporter-otlp-proto-grpc`") from exc
    exporter: SpanExporter = module.OTLPSpanExporter()  # it reads its endpoint, headers and timeout itself
    return exporter


def _exporters() -> list[SpanExporter]:
    names = {name.strip().lower() for name in (_env("OTEL_TRACES_EXPORTER") or "otlp").split(",") if name.strip()}
    if unknown := names - _EXPORTERS:
        raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter(s) {sorted(unknown)}; use otlp, console or none")
    if "none" in names:
        return []
    exporters: list[SpanExporter] = []
    endpoint = _env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or _env("OTEL_EXPORTER_OTLP_ENDPOINT")
    if "otlp" in names and endpoint:
        exporters.append(_otlp_exporter())
    if "console" in names:
        exporters.append(ConsoleSpanExporter())
    return exporters


def build_tracer_provider(default_service_name: str) -> trace.TracerProvider:
    """A tracer provider as the OTEL_* variables describe it (see the module docstring); no global changes.

    Raises ValueError or RuntimeError naming the variable when the configuration cannot be honoured.
    """
    if _env("OTEL_SDK_DISABLED").lower() == "true":
        return trace.NoOpTracerProvider()
    resource = _resource(default_service_name)
    exporters = _exporters()
    if not exporters:
        # Ids are made, nothing is kept: a span records only when its remote parent was sampled.
        return TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_OFF), shutdown_on_exit=False)
    provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def configure_tracing(default_service_name: str) -> trace.TracerProvider:
    """The process's tracer provider: built from the environment on the first call, and installed as
    OpenTelemetry's global one; later calls return the same provider whatever name they pass."""
    global _configured
    with _lock:
        if _configured is None:
            _configured = build_tracer_provider(default_service_name)
            trace.set_tracer_provider(_configured)
        return _configured


def flush_tracing(provider: trace.TracerProvider, timeout_seconds: float = 5.0) -> None:
    """Export what the provider still holds (call it when the process stops); a no-op without an SDK."""
    if isinstance(provider, TracerProvider):
        provider.force_flush(int(timeout_seconds * 1000))


def current_traceparent() -> str | None:
    """The W3C `traceparent` of the current span (`00-<trace id>-<span id>-<flags>`), or None when there
    is no valid span (tracing off, or outside any span). Store it to continue the trace elsewhere."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    trace_id, span_id = format_trace_id(span_context.trace_id), format_span_id(span_context.span_id)
    return f"00-{trace_id}-{span_id}-{span_context.trace_flags:02x}"


def context_from_traceparent(traceparent: str | None) -> Context:
    """A context whose parent is the remote span `traceparent` names, to start a span in:
    `tracer.start_as_current_span(name, context=context_from_traceparent(tp))`.

    None, an empty or a malformed value gives an empty context, so the span starts a new trace (it
    never silently becomes a child of whatever span happens to be current).
    """
    if not traceparent:
        return Context()
    return _PROPAGATOR.extract({"traceparent": traceparent}, context=Context())


def current_trace_id() -> str | None:
    """The current span's trace id as 32 hex digits, or None outside a valid span."""
    span_context = trace.get_current_span().get_span_context()
    return format_trace_id(span_context.trace_id) if span_context.is_valid else None


class TraceContextFilter(logging.Filter):
    """Puts `trace_id` and `span_id` on every log record made inside a valid span.

    A record that already has a `trace_id` (passed with `extra=`, e.g. the trace of an outbox row
    logged outside its span) keeps it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "trace_id"):
            span_context = trace.get_current_span().get_span_context()
            if span_context.is_valid:
                record.trace_id = format_trace_id(span_context.trace_id)
                record.span_id = format_span_id(span_context.span_id)
        return True


def is_exporting(provider: trace.TracerProvider) -> bool:
    """Whether spans of `provider` go anywhere: an SDK provider with a span processor (an exporter).

    When none does, a process that only relays a trace context (the relay) passes it on unchanged
    instead of making spans nobody will see.
    """
    if not isinstance(provider, TracerProvider):
        return False
    processor = getattr(provider, "_active_span_processor", None)
    return bool(getattr(processor, "_span_processors", ()))


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id (32 hex digits) a W3C `traceparent` carries, or None when it carries none."""
    if not traceparent:
        return None
    parts = traceparent.split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or parts[1] == "0" * 32:
        return None
    return parts[1]
