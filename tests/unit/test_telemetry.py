"""Tracing follows the OTEL_* variables, costs nothing without an endpoint, and its trace context
survives the trip through a `traceparent` string; log lines carry the trace id."""

from __future__ import annotations

import http.server
import io
import json
import logging
import os
import threading
from collections.abc import Iterator
from unittest import mock

import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import format_span_id, format_trace_id

from core.logging import JsonFormatter, TextFormatter
from core.telemetry import (
    TraceContextFilter,
    build_tracer_provider,
    context_from_traceparent,
    current_trace_id,
    current_traceparent,
    flush_tracing,
)

SAMPLED_PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
UNSAMPLED_PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer(exporter: InMemorySpanExporter) -> trace.Tracer:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test")


@pytest.fixture
def otel_env() -> Iterator[dict[str, str]]:
    """A clean OTEL_* environment; the test fills the dict before building a provider."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("OTEL_")}
    with mock.patch.dict(os.environ, env, clear=True):
        yield os.environ  # type: ignore[misc]


def _processors(provider: trace.TracerProvider) -> tuple[object, ...]:
    assert isinstance(provider, TracerProvider)
    # The SDK keeps its processors privately; no public accessor exists.
    return tuple(provider._active_span_processor._span_processors)


def test_no_traceparent_outside_a_span() -> None:
    assert current_traceparent() is None
    assert current_trace_id() is None


def test_current_traceparent_names_the_current_span(tracer: trace.Tracer) -> None:
    with tracer.start_as_current_span("work") as span:
        context = span.get_span_context()
        # The flags byte as the W3C propagator writes it: sampled, and (level 2) a random trace id.
        expected = f"00-{format_trace_id(context.trace_id)}-{format_span_id(context.span_id)}-{context.trace_flags:02x}"
        assert current_traceparent() == expected
        assert context.trace_flags.sampled
        assert current_trace_id() == format_trace_id(context.trace_id)


def test_a_span_started_from_a_traceparent_continues_that_trace(
    tracer: trace.Tracer, exporter: InMemorySpanExporter
) -> None:
    with tracer.start_as_current_span("publish", context=context_from_traceparent(SAMPLED_PARENT)):
        tp = current_traceparent()
    [span] = exporter.get_finished_spans()
    assert span.context is not None
    assert span.parent is not None
    assert format_trace_id(span.context.trace_id) == "0af7651916cd43dd8448eb211c80319c"
    assert format_span_id(span.parent.span_id) == "b7ad6b7169203331"
    assert span.parent.is_remote
    assert tp is not None
    assert tp.split("-")[1] == "0af7651916cd43dd8448eb211c80319c"


@pytest.mark.parametrize("value", [None, "", "garbage", "00-00000000000000000000000000000000-b7ad6b7169203331-01"])
def test_no_or_a_bad_traceparent_starts_a_new_trace_even_inside_another_span(
    tracer: trace.Tracer, exporter: InMemorySpanExporter, value: str | None
) -> None:
    context = context_from_traceparent(value)
    with tracer.start_as_current_span("batch"), tracer.start_as_current_span("row", context=context):
        pass
    row, batch = exporter.get_finished_spans()
    assert row.parent is None
    assert row.context is not None
    assert batch.context is not None
    assert row.context.trace_id != batch.context.trace_id


def test_without_an_endpoint_nothing_records_but_ids_still_flow(otel_env: dict[str, str]) -> None:
    provider = build_tracer_provider("outbox-test")
    assert _processors(provider) == ()
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("root") as root:
        assert not root.is_recording()
        assert root.get_span_context().is_valid  # logs and outbox rows still get a trace id
        assert current_traceparent() is not None
    with tracer.start_as_current_span("continued", context=context_from_traceparent(UNSAMPLED_PARENT)) as span:
        assert not span.is_recording()
        assert format_trace_id(span.get_span_context().trace_id) == "0af7651916cd43dd8448eb211c80319c"
    # A caller that samples its trace gets it recorded (here by no processor: nothing is exported).
    with tracer.start_as_current_span("sampled", context=context_from_traceparent(SAMPLED_PARENT)) as span:
        assert span.is_recording()


class _Collector(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP collector that keeps what it receives."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _CollectorHandler)
        self.received: list[tuple[str, ExportTraceServiceRequest]] = []


class _CollectorHandler(http.server.BaseHTTPRequestHandler):
    server: _Collector

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append((self.path, ExportTraceServiceRequest.FromString(body)))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[_Collector]:
    server = _Collector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("variable", "path"), [("OTEL_EXPORTER_OTLP_ENDPOINT", ""), ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "/v1/traces")]
)
def test_an_endpoint_turns_on_otlp_export(
    otel_env: dict[str, str], collector: _Collector, variable: str, path: str
) -> None:
    otel_env[variable] = f"http://127.0.0.1:{collector.server_address[1]}{path}"
    provider = build_tracer_provider("outbox-test")
    [processor] = _processors(provider)
    assert isinstance(processor, BatchSpanProcessor)  # spans leave in batches, off the request path
    with provider.get_tracer("test").start_as_current_span("root") as span:
        assert span.is_recording()  # the default sampler, parentbased_always_on
    flush_tracing(provider)
    [(received_path, request)] = collector.received
    assert received_path == "/v1/traces"
    [resource_spans] = request.resource_spans
    service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}["service.name"]
    assert service == "outbox-test"
    assert [s.name for s in resource_spans.scope_spans[0].spans] == ["root"]
    assert isinstance(provider, TracerProvider)
    provider.shutdown()


def test_the_service_name_is_the_process_default_unless_the_environment_names_one(otel_env: dict[str, str]) -> None:
    provider = build_tracer_provider("outbox-api")
    assert isinstance(provider, TracerProvider)
    assert provider.resource.attributes["service.name"] == "outbox-api"
    otel_env["OTEL_SERVICE_NAME"] = "payments-api"
    provider = build_tracer_provider("outbox-api")
    assert isinstance(provider, TracerProvider)
    assert provider.resource.attributes["service.name"] == "payments-api"
    del otel_env["OTEL_SERVICE_NAME"]
    otel_env["OTEL_RESOURCE_ATTRIBUTES"] = "service.name=from-attributes,deployment.environment=test"
    provider = build_tracer_provider("outbox-api")
    assert isinstance(provider, TracerProvider)
    assert provider.resource.attributes["service.name"] == "from-attributes"


def test_sdk_disabled_means_no_ids_at_all(otel_env: dict[str, str]) -> None:
    otel_env["OTEL_SDK_DISABLED"] = "true"
    provider = build_tracer_provider("outbox-test")
    with provider.get_tracer("test").start_as_current_span("root"):
        assert current_traceparent() is None


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "PROTOCOL"),
    ],
)
def test_a_configuration_that_cannot_be_honoured_is_refused_naming_the_variable(
    otel_env: dict[str, str], env: dict[str, str], variable: str
) -> None:
    otel_env.update(env)
    with pytest.raises(ValueError, match=variable):
        build_tracer_provider("outbox-test")


def _log_line(formatter: logging.Formatter, **extra: str) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(TraceContextFilter())
    handler.setFormatter(formatter)
    logger = logging.getLogger("tests.telemetry")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("something happened", extra=extra)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    return stream.getvalue()


def test_json_log_lines_carry_the_trace_id_inside_a_span(tracer: trace.Tracer) -> None:
    assert "trace_id" not in json.loads(_log_line(JsonFormatter("test")))
    with tracer.start_as_current_span("work") as span:
        entry = json.loads(_log_line(JsonFormatter("test")))
        explicit = json.loads(_log_line(JsonFormatter("test"), trace_id="0af7651916cd43dd8448eb211c80319c"))
    assert entry["trace_id"] == format_trace_id(span.get_span_context().trace_id)
    assert entry["span_id"] == format_span_id(span.get_span_context().span_id)
    assert explicit["trace_id"] == "0af7651916cd43dd8448eb211c80319c"  # an explicit one wins


def test_text_log_lines_end_with_the_trace_id_inside_a_span(tracer: trace.Tracer) -> None:
    assert "trace_id" not in _log_line(TextFormatter("test"))
    with tracer.start_as_current_span("work") as span:
        line = _log_line(TextFormatter("test"))
    assert line.rstrip().endswith(f"trace_id={format_trace_id(span.get_span_context().trace_id)}")
