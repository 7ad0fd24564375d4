"""One trace id from the HTTP request through the stored outbox row and the relay's publish (its
PRODUCER span and the message's headers) to the worker's CONSUMER task span; in-process, with an
in-memory span exporter, for a transfer made with a `traceparent` header and for one made without."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import asyncpg
import httpx
import pytest
import redis
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, format_span_id, format_trace_id
from sqlalchemy.ext.asyncio import AsyncEngine

from api.main import create_app
from core.contract import AUDIT_LOG_TRANSACTION
from core.settings import Settings
from relay.batch import relay_batch
from relay.celery_app import create_celery_app as create_relay_app
from relay.publisher import RedisBatchPublisher
from relay.tracing import CREATED_AT_HEADER, TRACEPARENT_HEADER, PublishTracer
from tests.support.environment import ADMIN_KEY
from tests.support.relays import queued_messages
from tests.support.workers import worker_settings
from worker.celery_app import WorkerApp, create_celery_app

PARENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"
OPERATOR = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(spans: InMemorySpanExporter) -> TracerProvider:
    made = TracerProvider(shutdown_on_exit=False)
    made.add_span_processor(SimpleSpanProcessor(spans))
    return made


@pytest.fixture
def worker_app(database_url: str, redis_url: str, provider: TracerProvider) -> Iterator[WorkerApp]:
    app = create_celery_app(worker_settings(database_url, redis_url, audit_write_delay=0))
    app.tracer_provider = provider  # read by worker.observability
    try:
        yield app
    finally:
        app.context.database.close()


def _ids(traceparent: str) -> tuple[str, str]:
    _, trace_id, span_id, _ = traceparent.split("-")
    return trace_id, span_id


async def _transfer(settings: Settings, provider: TracerProvider, headers: dict[str, str]) -> str:
    app = create_app(settings, tracer_provider=provider)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            made = await http.post("/api/v1/clients", json={"name": "traced"}, headers=OPERATOR)
            http.headers["Authorization"] = f"Bearer {made.json()['api_key']}"
            accounts = []
            for _ in range(2):
                opened = await http.post("/api/v1/accounts", json={"owner_email": "o@example.com", "currency": "EUR"})
                accounts.append(opened.json()["id"])
            deposit = await http.post(
                f"/api/v1/accounts/{accounts[0]}/deposits",
                json={"amount": "10.00"},
                headers={**OPERATOR, "Idempotency-Key": str(uuid.uuid4())},
            )
            assert deposit.status_code == 201, deposit.text
            body = {"from_account_id": accounts[0], "to_account_id": accounts[1], "amount": "1.00"}
            answer = await http.post("/api/v1/transactions/transfer", json=body, headers=headers)
            assert answer.status_code == 201, answer.text
            transaction_id: str = answer.json()["id"]
            return transaction_id


@pytest.mark.parametrize("caller_sends_traceparent", [True, False], ids=["with-traceparent", "without"])
async def test_one_trace_runs_from_the_request_to_the_task(
    settings: Settings,
    engine: AsyncEngine,
    database_url: str,
    redis_url: str,
    provider: TracerProvider,
    spans: InMemorySpanExporter,
    worker_app: WorkerApp,
    db: asyncpg.Connection,
    caller_sends_traceparent: bool,
) -> None:
    headers = {"traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-01"} if caller_sends_traceparent else {}
    transaction_id = await _transfer(settings, provider, headers)
    server = next(s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER and s.name.endswith("/transfer"))
    assert server.context is not None
    trace_id = format_trace_id(server.context.trace_id)
    if caller_sends_traceparent:
        assert trace_id == PARENT_TRACE
    else:
        assert trace_id != PARENT_TRACE
        assert int(trace_id, 16) != 0

    connection = db
    rows = await connection.fetch(
        "SELECT id, traceparent FROM outbox WHERE transaction_id = $1", uuid.UUID(transaction_id)
    )
    assert len(rows) == 2
    for row in rows:  # the request's trace context is stored with each row
        assert _ids(row["traceparent"])[0] == trace_id
    # Only this transfer's rows: the deposit's went out with an earlier batch.
    await connection.execute(
        "UPDATE outbox SET state = 'completed' WHERE transaction_id IS DISTINCT FROM $1", uuid.UUID(transaction_id)
    )
    queue = f"trace-{uuid.uuid4().hex[:8]}"
    relay_settings = settings.model_copy(update={"celery_task_queue": queue})
    publisher = RedisBatchPublisher(
        create_relay_app(relay_settings), redis_url, queue, 5.0, tracer=PublishTracer(queue, provider)
    )
    try:
        result = await relay_batch(connection, publisher, relay_settings)
    finally:
        await publisher.close()
    assert result.published == 2

    producers = {
        str((s.attributes or {})["messaging.message.id"]): s
        for s in spans.get_finished_spans()
        if s.kind == SpanKind.PRODUCER
    }
    client = redis.Redis.from_url(redis_url)
    try:
        messages = queued_messages(client, queue)
    finally:
        client.delete(queue)
        client.close()
    assert len(messages) == 2
    stored = {str(r["id"]): _ids(r["traceparent"])[1] for r in rows}
    for message in messages:
        producer = producers[message.task_id]
        assert producer.context is not None
        assert producer.parent is not None
        assert format_trace_id(producer.context.trace_id) == trace_id
        assert format_span_id(producer.parent.span_id) == stored[message.task_id]  # continues the stored row
        header = message.raw["headers"][TRACEPARENT_HEADER]
        assert _ids(header) == (trace_id, format_span_id(producer.context.span_id))  # names the publish span
        assert isinstance(message.raw["headers"][CREATED_AT_HEADER], float)

    audit = next(m for m in messages if m.task_name == AUDIT_LOG_TRANSACTION)
    outcome = await asyncio.to_thread(
        worker_app.tasks[AUDIT_LOG_TRANSACTION].apply,
        kwargs=audit.kwargs,
        task_id=audit.task_id,
        headers={k: v for k, v in audit.raw["headers"].items() if k in (TRACEPARENT_HEADER, CREATED_AT_HEADER)},
    )
    assert outcome.successful(), outcome.traceback
    consumer = next(s for s in spans.get_finished_spans() if s.kind == SpanKind.CONSUMER)
    assert consumer.name == f"process {AUDIT_LOG_TRANSACTION}"
    assert consumer.context is not None
    assert consumer.parent is not None
    assert format_trace_id(consumer.context.trace_id) == trace_id
    publish = producers[audit.task_id].context
    assert publish is not None
    assert consumer.parent.span_id == publish.span_id
