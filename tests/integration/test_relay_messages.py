"""The fast path's messages are send_task's messages: compared field by field, then run by a real worker.

The relay's Redis fast path writes task messages itself (built by Celery's own code, sent in
one pipeline). This module publishes one row that way and one with Celery's send_task, compares
the two raw messages in the broker field by field, and has a real `celery -A worker.celery_app`
worker run both to completion.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import asyncpg
import pytest

from core.contract import AUDIT_LOG_TRANSACTION
from core.outbox.states import OutboxState
from core.settings import Settings
from relay.batch import relay_batch
from relay.publisher import RedisBatchPublisher, SendTaskPublisher, create_publisher
from tests.support.relays import PrivateRedis, new_queue
from tests.support.waiting import until
from tests.support.workers import start_worker, worker_env, worker_settings

# Quotes, a backslash and a newline make Celery's kwargsrepr differ from repr(): the fast path
# must then fall back to Celery's saferepr and still write the very same header.
KWARGS = {
    "transaction_id": "t-1",
    "data": {"amount": "12.50", "note": 'it\'s "quoted"\\ and\nsplit', "nested": {"deep": {"deeper": [1]}}},
}
# Fields that differ between any two messages by design: the task id (and what repeats it),
# the per-message delivery tag, reply_to, Celery's per-thread id (send_task runs in a thread), and
# the row's commit time (outbox_created_at, the relay's header for the worker's completion latency).
PER_MESSAGE = {
    "headers.id",
    "headers.outbox_created_at",
    "headers.root_id",
    "properties.correlation_id",
    "properties.delivery_tag",
    "properties.reply_to",
}


@pytest.fixture
def relay_settings(settings: Settings, broker: PrivateRedis) -> Settings:
    return settings.model_copy(update={"celery_broker_url_override": broker.url, "celery_task_queue": new_queue()})


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


async def publish_one(db: asyncpg.Connection, settings: Settings, fast: bool) -> uuid.UUID:
    row_id = uuid.uuid4()
    await db.execute(
        "INSERT INTO outbox (id, task_name, kwargs) VALUES ($1, $2, $3)", row_id, AUDIT_LOG_TRANSACTION, KWARGS
    )
    publisher = create_publisher(settings.model_copy(update={"relay_fast_publish": fast}))
    assert isinstance(publisher, RedisBatchPublisher if fast else SendTaskPublisher)
    try:
        result = await relay_batch(db, publisher, settings)
    finally:
        await publisher.close()
    assert (result.claimed, result.published) == (1, 1)
    return row_id


@pytest.mark.e2e
async def test_fast_path_message_equals_send_task_message_and_a_worker_runs_both(
    relay_settings: Settings, db: asyncpg.Connection, broker: PrivateRedis, database_url: str
) -> None:
    queue = relay_settings.celery_task_queue
    fast_id = await publish_one(db, relay_settings, fast=True)
    slow_id = await publish_one(db, relay_settings, fast=False)
    client = broker.client()
    fast_raw, slow_raw = (json.loads(raw) for raw in reversed(client.lrange(queue, 0, -1)))

    for raw in (fast_raw, slow_raw):  # compare the body's JSON values, not its whitespace
        raw["body"] = json.loads(base64.b64decode(raw["body"]))
    fast, slow = flatten(fast_raw), flatten(slow_raw)
    assert fast.keys() == slow.keys()
    assert {key: fast[key] for key in fast.keys() - PER_MESSAGE} == {
        key: slow[key] for key in slow.keys() - PER_MESSAGE
    }
    assert (fast["headers.id"], fast["headers.root_id"], fast["properties.correlation_id"]) == (str(fast_id),) * 3
    assert (slow["headers.id"], slow["headers.root_id"], slow["properties.correlation_id"]) == (str(slow_id),) * 3
    assert fast["properties.delivery_tag"] != slow["properties.delivery_tag"]
    assert fast["headers.kwargsrepr"] != repr(KWARGS)  # the saferepr fallback was taken, and matched
    # The queue's binding is declared as send_task's declare would.
    assert client.smembers(f"_kombu.binding.{queue}") == {f"{queue}\x06\x16\x06\x16{queue}".encode()}

    config = worker_settings(database_url, broker.url, celery_task_queue=queue)
    with start_worker(worker_env(config), queue=queue):

        async def both_completed() -> bool:
            rows = await db.fetch("SELECT state FROM outbox WHERE id = ANY($1::uuid[])", [fast_id, slow_id])
            return [r["state"] for r in rows] == [OutboxState.COMPLETED] * 2

        await until(both_completed, 20, "both rows completed by the worker")
    audits = await db.fetch("SELECT task_id, data FROM audit_log ORDER BY task_id")
    assert sorted(r["task_id"] for r in audits) == sorted([str(fast_id), str(slow_id)])
    assert all(r["data"] == KWARGS["data"] for r in audits)
