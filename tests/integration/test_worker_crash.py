"""A worker SIGKILLed in the middle of its tasks: a new worker finishes them, effects exactly once.

Worker A takes both tasks and is killed while the audit task sleeps and while the SMTP
server holds its reply to the email (the email is not accepted until that reply). Redis
keeps the two messages as unacknowledged; once they are older than the visibility timeout,
worker B's sweep puts them back on the queue. B takes over the email's expired lease, sends
the email once and writes the audit row once, and both outbox rows complete.

The visibility timeout is short here (6 s), and kombu applies it to every unacknowledged
message of the Redis database, so the test runs on a redis-server of its own: it re-queues
nothing another test (or session) left unacknowledged.
"""

from __future__ import annotations

import asyncio
import uuid
from contextlib import ExitStack
from typing import Any

import pytest
from celery.result import AsyncResult
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from core.contract import AUDIT_LOG_TRANSACTION, SEND_TRANSACTION_EMAIL
from tests.support.outbox import insert_outbox_row
from tests.support.servers import redis_server
from tests.support.smtp import smtp_sink
from tests.support.waiting import until, wait_until
from tests.support.workers import start_worker, worker_env, worker_settings
from worker.celery_app import create_celery_app

pytestmark = pytest.mark.e2e  # starts the worker as a process

SLOW = 2  # seconds: the audit's latency and the SMTP server's reply delay (under the soft limit)
LIMITS = {
    "celery_task_time_limit": 4,  # also the email lease: expired by the time Redis redelivers
    "celery_task_soft_time_limit": 3,
    "smtp_timeout": 3,  # under the time limit, which is also the email's lease
    "celery_visibility_timeout": 6,
    "celery_retry_backoff_max": 1,
    "audit_write_delay": SLOW,
}


async def _rows(engine: AsyncEngine, sql: str, **params: Any) -> list[Any]:
    async with engine.connect() as connection:
        return list((await connection.execute(text(sql), params)).all())


async def test_a_killed_worker_s_tasks_complete_once_on_a_new_worker(database_url: str, engine: AsyncEngine) -> None:
    queue = f"test-crash-{uuid.uuid4().hex[:8]}"
    email = {"email": "payer@example.com", "amount": "99.99", "status": "SUCCESS"}
    audit = {"transaction_id": str(uuid.uuid4()), "data": {"amount": "99.99"}}
    email_id = await insert_outbox_row(engine, SEND_TRANSACTION_EMAIL, email)
    audit_id = await insert_outbox_row(engine, AUDIT_LOG_TRANSACTION, audit)

    with ExitStack() as stack, redis_server(stack) as redis_url, smtp_sink(reply_delay=SLOW) as sink:
        settings = worker_settings(
            database_url, redis_url, celery_task_queue=queue, smtp_host=sink.host, smtp_port=sink.port, **LIMITS
        )
        env = worker_env(settings)
        client = create_celery_app(settings)
        with start_worker(env, queue=queue) as worker_a:
            client.send_task(SEND_TRANSACTION_EMAIL, kwargs=email, task_id=email_id)
            client.send_task(AUDIT_LOG_TRANSACTION, kwargs=audit, task_id=audit_id)
            started = "SELECT 1 FROM outbox WHERE id = :id AND delivery_started_at IS NOT NULL"
            await until(lambda: _rows(engine, started, id=audit_id), 30, "worker A to start the audit task")
            await asyncio.to_thread(
                wait_until, lambda: sink.started >= 1, 10, "worker A's email send reached the SMTP server"
            )
            worker_a.kill()  # SIGKILL: no acknowledgement, no clean-up
            worker_a.process.wait(timeout=5)

        assert sink.count == 0
        assert await _rows(engine, "SELECT 1 FROM audit_log WHERE task_id = :id", id=audit_id) == []

        # Worker B uses the prefork pool: the tasks' database access must also work after a fork.
        with start_worker(env, queue=queue, pool="prefork", concurrency=2) as worker_b:
            results = [
                await asyncio.to_thread(AsyncResult(task_id, app=client).get, timeout=30)
                for task_id in (email_id, audit_id)
            ]
            # Celery stores a task's result before its child process logs the success: wait for the line.
            email_line = f"{SEND_TRANSACTION_EMAIL}[{email_id}] succeeded"
            audit_line = f"{AUDIT_LOG_TRANSACTION}[{audit_id}] succeeded"
            await until(lambda: email_line in worker_b.log(), 10, f"worker B to log {email_line!r}")
            await until(lambda: audit_line in worker_b.log(), 10, f"worker B to log {audit_line!r}")
        client.close()

    assert [result["task_id"] for result in results] == [email_id, audit_id]
    assert len(sink.received(message_id=f"<{email_id}@outbox-transfers>")) == 1
    assert sink.count == 1
    assert len(await _rows(engine, "SELECT 1 FROM audit_log WHERE task_id = :id", id=audit_id)) == 1
    states = await _rows(
        engine, "SELECT state FROM outbox WHERE id IN (CAST(:a AS uuid), CAST(:b AS uuid))", a=email_id, b=audit_id
    )
    assert [row.state for row in states] == ["completed", "completed"]
