"""A real `celery -A worker.celery_app worker` process runs the tasks sent by name.

One worker and one SMTP sink serve the module, once with the default pool (worker/pool.py) and once
with Celery's threads pool; each module run uses its own queue, so parallel test sessions on the
same Redis never take each other's messages.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery.result import AsyncResult
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from core.contract import AUDIT_LOG_TRANSACTION, SEND_TRANSACTION_EMAIL
from core.settings import Settings
from tests.support.outbox import insert_outbox_row
from tests.support.smtp import SmtpSink, smtp_sink
from tests.support.waiting import until
from tests.support.workers import RunningWorker, start_worker, worker_env, worker_settings
from worker.celery_app import WorkerApp, create_celery_app
from worker.errors import InvalidTaskArguments

pytestmark = pytest.mark.e2e  # starts the worker as a process

# Short limits so a duplicate waiting for another delivery's lease comes back within seconds.
LIMITS = {
    "celery_task_time_limit": 4,
    "celery_task_soft_time_limit": 3,
    "smtp_timeout": 3,  # under the time limit, which is also the email's lease
    "celery_visibility_timeout": 10,
    "celery_retry_backoff_max": 5,
}
EMAIL = {"email": "payer@example.com", "amount": "12.50", "status": "SUCCESS"}


@pytest.fixture(scope="module")
def sink() -> Iterator[SmtpSink]:
    with smtp_sink() as server:
        yield server


@pytest.fixture(scope="module")
def worker_config(database_url: str, redis_url: str, sink: SmtpSink) -> Settings:
    queue = f"test-worker-{uuid.uuid4().hex[:8]}"
    return worker_settings(
        database_url, redis_url, celery_task_queue=queue, smtp_host=sink.host, smtp_port=sink.port, **LIMITS
    )


@pytest.fixture(scope="module", params=["asyncio", "threads"])
def worker(worker_config: Settings, request: pytest.FixtureRequest) -> Iterator[RunningWorker]:
    with start_worker(worker_env(worker_config), queue=worker_config.celery_task_queue, pool=request.param) as running:
        yield running


@pytest.fixture(scope="module")
def client(worker_config: Settings) -> Iterator[WorkerApp]:
    """Publishes by name to the worker's queue and reads the result backend, like the relay."""
    app = create_celery_app(worker_config)
    yield app
    app.close()


async def scalar(engine: AsyncEngine, sql: str, **params: Any) -> Any:
    async with engine.connect() as connection:
        return (await connection.execute(text(sql), params)).scalar()


async def result_of(client: WorkerApp, task_id: str, within: float = 20.0) -> Any:
    return await asyncio.to_thread(AsyncResult(task_id, app=client).get, timeout=within)


async def test_a_worker_runs_both_tasks_sent_by_name(
    worker: RunningWorker, client: WorkerApp, engine: AsyncEngine, sink: SmtpSink, redis_url: str
) -> None:
    audit = {"transaction_id": str(uuid.uuid4()), "data": {"amount": "12.50", "currency": "EUR"}}
    email_id = await insert_outbox_row(engine, SEND_TRANSACTION_EMAIL, EMAIL)
    audit_id = await insert_outbox_row(engine, AUDIT_LOG_TRANSACTION, audit)
    client.send_task(SEND_TRANSACTION_EMAIL, kwargs=EMAIL, task_id=email_id)
    client.send_task(AUDIT_LOG_TRANSACTION, kwargs=audit, task_id=audit_id)

    email_result = await result_of(client, email_id)
    audit_result = await result_of(client, audit_id)

    assert email_result == {
        "success": True,
        "message": f"Transfer notification sent to {EMAIL['email']}",
        "task_id": email_id,
    }
    assert audit_result == {
        "success": True,
        "message": f"Audit log written for transaction {audit['transaction_id']}",
        "task_id": audit_id,
        "transaction_id": audit["transaction_id"],
    }
    # Stored by the worker in the Redis result backend, under the task ids.
    backend = redis.Redis.from_url(redis_url)
    for task_id, expected in ((email_id, email_result), (audit_id, audit_result)):
        stored = json.loads(backend.get(f"celery-task-meta-{task_id}") or b"{}")
        assert (stored.get("status"), stored.get("result")) == ("SUCCESS", expected)
    backend.close()
    assert len(sink.received(message_id=f"<{email_id}@outbox-transfers>")) == 1
    assert await scalar(engine, "SELECT data FROM audit_log WHERE task_id = :id", id=audit_id) == audit["data"]
    # Completion is recorded on the outbox rows, keyed by the task id.
    for outbox_id in (email_id, audit_id):
        state = await scalar(engine, "SELECT state FROM outbox WHERE id = CAST(:id AS uuid)", id=outbox_id)
        assert state == "completed"
    # One line per run, without the arguments or the result: the address is personal data.
    log = worker.log()
    for task_name, task_id in ((SEND_TRANSACTION_EMAIL, email_id), (AUDIT_LOG_TRANSACTION, audit_id)):
        assert f"{task_name}[{task_id}] succeeded in " in log
    assert EMAIL["email"] not in log


async def test_the_same_task_id_delivered_twice_has_one_effect(
    worker: RunningWorker, client: WorkerApp, engine: AsyncEngine, sink: SmtpSink
) -> None:
    audit = {"transaction_id": str(uuid.uuid4()), "data": {"n": 1}}
    email_id = await insert_outbox_row(engine, SEND_TRANSACTION_EMAIL, EMAIL)
    audit_id = await insert_outbox_row(engine, AUDIT_LOG_TRANSACTION, audit)
    # Two deliveries at once (as after a relay crash), then a third after the effect exists.
    for _ in range(2):
        client.send_task(SEND_TRANSACTION_EMAIL, kwargs=EMAIL, task_id=email_id)
        client.send_task(AUDIT_LOG_TRANSACTION, kwargs=audit, task_id=audit_id)
    for task_name, task_id in ((SEND_TRANSACTION_EMAIL, email_id), (AUDIT_LOG_TRANSACTION, audit_id)):
        await asyncio.to_thread(worker.wait_for_log, f"{task_name}[{task_id}] succeeded", count=2, timeout=20)
    client.send_task(SEND_TRANSACTION_EMAIL, kwargs=EMAIL, task_id=email_id)
    client.send_task(AUDIT_LOG_TRANSACTION, kwargs=audit, task_id=audit_id)
    for task_name, task_id in ((SEND_TRANSACTION_EMAIL, email_id), (AUDIT_LOG_TRANSACTION, audit_id)):
        await asyncio.to_thread(worker.wait_for_log, f"{task_name}[{task_id}] succeeded", count=3, timeout=20)

    assert len(sink.received(message_id=f"<{email_id}@outbox-transfers>")) == 1
    assert await scalar(engine, "SELECT count(*) FROM audit_log WHERE task_id = :id", id=audit_id) == 1
    assert (await result_of(client, audit_id))["task_id"] == audit_id


async def test_bad_arguments_fail_visibly_and_mark_the_row_failed(
    worker: RunningWorker, client: WorkerApp, engine: AsyncEngine
) -> None:
    outbox_id = await insert_outbox_row(engine, SEND_TRANSACTION_EMAIL, {})
    client.send_task(SEND_TRANSACTION_EMAIL, kwargs={**EMAIL, "email": "not-an-email"}, task_id=outbox_id)

    with pytest.raises(InvalidTaskArguments, match="email"):
        await result_of(client, outbox_id)
    assert AsyncResult(outbox_id, app=client).state == "FAILURE"

    async def row_failed() -> bool:
        state = await scalar(engine, "SELECT state FROM outbox WHERE id = CAST(:id AS uuid)", id=outbox_id)
        return bool(state == "failed")

    await until(row_failed, 20, "the outbox row marked failed")
    error = await scalar(engine, "SELECT last_error FROM outbox WHERE id = CAST(:id AS uuid)", id=outbox_id)
    assert "InvalidTaskArguments" in error
    assert "email" in error
    log = worker.log()
    assert f"{SEND_TRANSACTION_EMAIL}[{outbox_id}] failed in " in log
    assert f"[{outbox_id}] retried" not in log
