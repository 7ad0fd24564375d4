"""The API measures itself on its own /metrics port and traces every request, continuing the
caller's trace: the scrape shows what the requests did, the spans join the caller's trace."""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, format_span_id, format_trace_id
from sqlalchemy.ext.asyncio import AsyncEngine

from api.main import create_app
from core.settings import Settings
from core.telemetry import TraceContextFilter, current_trace_id, current_traceparent
from devservers.embedded import free_port
from tests.support.environment import ADMIN_KEY
from tests.support.metrics import scrape, value

TRANSFER = "/api/v1/transactions/transfer"
DEPOSITS = "/api/v1/accounts/{account_id}/deposits"
OPERATOR = {"Authorization": f"Bearer {ADMIN_KEY}"}
PARENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{PARENT_TRACE}-{PARENT_SPAN}-01"


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer_provider(spans: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(spans))
    return provider


@asynccontextmanager
async def serving(app: FastAPI, *, as_client: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client on the app; with `as_client`, authenticated as a client the operator made."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            if as_client:
                made = await http.post("/api/v1/clients", json={"name": "observed"}, headers=OPERATOR)
                assert made.status_code == 201, made.text
                http.headers["Authorization"] = f"Bearer {made.json()['api_key']}"
            yield http


async def _account(http: httpx.AsyncClient, balance: str = "100.00") -> str:
    """An account of the client's, with `balance` deposited by the operator (none for zero)."""
    response = await http.post("/api/v1/accounts", json={"owner_email": "o@example.com", "currency": "EUR"})
    assert response.status_code == 201, response.text
    account_id: str = response.json()["id"]
    if balance != "0.00":
        deposit = await http.post(
            f"/api/v1/accounts/{account_id}/deposits",
            json={"amount": balance},
            headers={**OPERATOR, "Idempotency-Key": str(uuid.uuid4())},
        )
        assert deposit.status_code == 201, deposit.text
    return account_id


async def test_the_metrics_port_shows_requests_by_route_template_and_transfers_by_outcome(
    settings: Settings, engine: AsyncEngine
) -> None:
    app = create_app(settings)
    async with serving(app) as http:
        source, target = await _account(http), await _account(http, "0.00")
        body = {"from_account_id": source, "to_account_id": target, "amount": "1.00"}
        assert (await http.post(TRANSFER, json=body, headers={"Idempotency-Key": "k1"})).status_code == 201
        # A replay answers as the original did (201, the same body); the metrics still tell them apart.
        assert (await http.post(TRANSFER, json=body, headers={"Idempotency-Key": "k1"})).status_code == 201
        assert (await http.post(TRANSFER, json={**body, "amount": "1000.00"})).status_code == 409
        assert (await http.post(TRANSFER, json={**body, "amount": "-1"})).status_code == 422
        assert (await http.post(TRANSFER, json={**body, "amount": "1000000.01"})).status_code == 422
        unknown = {**body, "to_account_id": str(uuid.uuid4())}
        assert (await http.post(TRANSFER, json=unknown)).status_code == 404
        assert (await http.get(f"/api/v1/accounts/{source}")).status_code == 200
        assert (await http.get(f"/api/v1/accounts/{uuid.uuid4()}")).status_code == 404
        assert (await http.get("/no/such/path")).status_code == 404
        for method in ("BREW", "X-INVENTED"):  # any client can send a method of its own
            assert (await http.request(method, "/no/such/path")).status_code == 404
        assert (await http.get("/health/live")).status_code == 200
        samples = scrape(settings.api_metrics_port)

    def requests(handler: str, method: str, status: str) -> float:
        return value(samples, "http_requests_total", handler=handler, method=method, status=status)

    assert requests("/api/v1/accounts", "POST", "201") == 2
    assert requests("/api/v1/clients", "POST", "201") == 1
    assert requests(DEPOSITS, "POST", "201") == 1
    assert requests(TRANSFER, "POST", "201") == 2
    assert requests(TRANSFER, "POST", "422") == 2
    assert requests("/api/v1/accounts/{account_id}", "GET", "200") == 1
    assert requests("/api/v1/accounts/{account_id}", "GET", "404") == 1
    assert requests("none", "GET", "404") == 1  # an unknown path never becomes a label value
    assert requests("none", "other", "404") == 2  # nor an unknown method
    assert {dict(labels)["method"] for name, labels in samples if name == "http_requests_total"} == {
        "GET",
        "POST",
        "other",
    }
    histogram = {"handler": TRANSFER, "method": "POST", "status": "201"}
    assert value(samples, "http_request_duration_seconds_count", **histogram) == 2
    assert value(samples, "http_request_duration_seconds_bucket", **histogram, le="+Inf") == 2
    assert not [labels for name, labels in samples if ("handler", "/health/live") in labels], "probes are not counted"
    assert {dict(labels)["handler"] for name, labels in samples if name == "http_requests_total"} == {
        "/api/v1/clients",
        "/api/v1/accounts",
        DEPOSITS,
        "/api/v1/accounts/{account_id}",
        TRANSFER,
        "none",
    }

    def transfers(outcome: str, reason: str = "") -> float:
        return value(samples, "transfers_total", outcome=outcome, reason=reason)

    assert transfers("created") == 1
    assert transfers("replayed") == 1
    assert transfers("refused", "insufficient_funds") == 1
    assert transfers("refused", "validation_error") == 2  # a body the schema refuses, an amount above the maximum
    assert transfers("refused", "account_not_found") == 1
    assert value(samples, "process_cpu_seconds_total") > 0


async def test_an_unreachable_database_counts_as_unavailable(settings: Settings) -> None:
    down = settings.model_copy(update={"database_url": "postgresql://postgres@127.0.0.1:1/nowhere"})
    app = create_app(down)
    async with serving(app, as_client=False) as http:
        body = {"from_account_id": str(uuid.uuid4()), "to_account_id": str(uuid.uuid4()), "amount": "1.00"}
        # A client's key is looked up in the database, which is down.
        key = {"Authorization": "Bearer " + "k" * 43}
        assert (await http.post(TRANSFER, json=body, headers=key)).status_code == 503
        samples = scrape(down.api_metrics_port)
    assert value(samples, "transfers_total", outcome="unavailable", reason="database_unavailable") == 1


async def test_two_apps_in_one_process_count_separately(settings: Settings, engine: AsyncEngine) -> None:
    """A registry per app: no duplicate-metric error, and neither app sees the other's requests."""
    other = settings.model_copy(update={"api_metrics_port": free_port()})
    first, second = create_app(settings), create_app(other)
    async with serving(first) as http_first, serving(second) as http_second:
        await _account(http_first)
        await _account(http_first)
        await _account(http_second)
        counts = [
            value(scrape(port), "http_requests_total", handler="/api/v1/accounts", method="POST", status="201")
            for port in (settings.api_metrics_port, other.api_metrics_port)
        ]
    assert counts == [2, 1]


async def test_port_zero_measures_nothing(settings: Settings, engine: AsyncEngine) -> None:
    app = create_app(settings.model_copy(update={"api_metrics_port": 0}))
    assert app.state.metrics is None
    async with serving(app) as http:
        source, target = await _account(http), await _account(http)
        body = {"from_account_id": source, "to_account_id": target, "amount": "1.00"}
        assert (await http.post(TRANSFER, json=body)).status_code == 201
        assert (await http.post(TRANSFER, json={**body, "amount": "-1"})).status_code == 422


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        yield holder.getsockname()[1]


async def test_a_taken_metrics_port_stops_start_up_naming_the_variable(settings: Settings, taken_port: int) -> None:
    app = create_app(settings.model_copy(update={"api_metrics_port": taken_port}))
    with pytest.raises(RuntimeError, match=f"API_METRICS_PORT={taken_port}"):
        async with app.router.lifespan_context(app):
            pass


# --- Traces ---


def _traced_app(settings: Settings, provider: TracerProvider) -> FastAPI:
    """The real app plus two probes: one answers what tracing sees inside a route, one fails."""
    app = create_app(settings, tracer_provider=provider)

    @app.get("/test/trace")
    async def seen() -> dict[str, str | None]:
        return {"traceparent": current_traceparent(), "trace_id": current_trace_id()}

    @app.get("/test/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    return app


def _server_span(spans: InMemorySpanExporter) -> ReadableSpan:
    [span] = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    return span


async def test_a_request_with_a_traceparent_continues_that_trace(
    settings: Settings, engine: AsyncEngine, tracer_provider: TracerProvider, spans: InMemorySpanExporter
) -> None:
    async with serving(_traced_app(settings, tracer_provider)) as http:
        seen = (await http.get("/test/trace", headers={"traceparent": TRACEPARENT, "tracestate": "v=1"})).json()
        source, target = await _account(http), await _account(http, "0.00")
        spans.clear()
        body = {"from_account_id": source, "to_account_id": target, "amount": "1.00"}
        assert (await http.post(TRANSFER, json=body, headers={"traceparent": TRACEPARENT})).status_code == 201

    span = _server_span(spans)
    assert span.context is not None
    assert span.parent is not None
    assert format_trace_id(span.context.trace_id) == PARENT_TRACE
    assert format_span_id(span.parent.span_id) == PARENT_SPAN
    assert span.parent.is_remote
    assert span.name == f"POST {TRANSFER}"
    assert span.attributes is not None
    assert span.attributes["http.route"] == TRANSFER
    assert span.attributes["http.response.status_code"] == 201
    assert span.attributes["http.request.method"] == "POST"

    assert seen["trace_id"] == PARENT_TRACE
    version, trace_id, span_id, flags = seen["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", PARENT_TRACE, "01")
    assert span_id != PARENT_SPAN  # the server span's own id: the route runs inside it


async def test_a_request_without_a_traceparent_starts_a_new_trace(
    settings: Settings, engine: AsyncEngine, tracer_provider: TracerProvider, spans: InMemorySpanExporter
) -> None:
    async with serving(_traced_app(settings, tracer_provider)) as http:
        spans.clear()  # the operator's request that made the client
        first = (await http.get("/test/trace")).json()
        second = (await http.get("/test/trace")).json()
    servers = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert [s.parent for s in servers] == [None, None]
    trace_ids = [format_trace_id(s.context.trace_id) for s in servers if s.context is not None]
    assert trace_ids == [first["trace_id"], second["trace_id"]]
    assert first["trace_id"] != second["trace_id"]
    assert first["traceparent"].startswith(f"00-{first['trace_id']}-")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_an_unexpected_error_is_logged_inside_the_request_trace(
    settings: Settings, engine: AsyncEngine, tracer_provider: TracerProvider, spans: InMemorySpanExporter
) -> None:
    handler = _Records()
    handler.addFilter(TraceContextFilter())
    errors = logging.getLogger("api.errors")
    errors.addHandler(handler)
    try:
        async with serving(_traced_app(settings, tracer_provider)) as http:
            spans.clear()  # the operator's request that made the client
            response = await http.get("/test/boom", headers={"traceparent": TRACEPARENT})
    finally:
        errors.removeHandler(handler)
    assert response.status_code == 500
    [record] = [r for r in handler.records if r.getMessage().startswith("unhandled error")]
    assert getattr(record, "trace_id", None) == PARENT_TRACE
    span = _server_span(spans)
    assert span.status.status_code == StatusCode.ERROR
    assert [event.name for event in span.events] == ["exception"]
