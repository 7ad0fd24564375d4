"""The default pool (worker/pool.py): tasks in flight are coroutines on one loop, not a thread each.

A real worker process with the default configuration runs hundreds of audit tasks that each wait
on the audit system (AUDIT_WRITE_DELAY); the test watches the outbox rows and the process's threads
while they wait, then checks every effect happened once.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from typing import Any

import psutil
import pytest
from celery.result import AsyncResult
from sqlalchemy.ext.asyncio import AsyncEngine

from core.contract import AUDIT_LOG_TRANSACTION
from core.settings import Settings
from tests.support.database import fetch
from tests.support.outbox import insert_outbox_row
from tests.support.workers import start_worker, worker_env, worker_settings
from worker.celery_app import WorkerApp, create_celery_app

pytestmark = pytest.mark.e2e  # starts the worker as a process

TASKS = 300
WAIT_S = 3.0  # each task's simulated wait on the audit system


async def _count(engine: AsyncEngine, ids: list[str], condition: str) -> int:
    rows = await fetch(
        engine,
        f"SELECT count(*) AS n FROM outbox WHERE id = ANY($1::uuid[]) AND {condition}",
        [uuid.UUID(i) for i in ids],
    )
    return int(rows[0]["n"])


async def _delivering(engine: AsyncEngine, ids: list[str]) -> int:
    """Rows whose delivery started and whose task has not completed: tasks in flight."""
    return await _count(engine, ids, "delivery_started_at IS NOT NULL AND state <> 'completed'")


async def _completed(engine: AsyncEngine, ids: list[str]) -> int:
    return await _count(engine, ids, "state = 'completed'")


async def _waiting_audits(
    database_url: str, redis_url: str, engine: AsyncEngine, count: int
) -> tuple[Settings, WorkerApp, list[dict[str, Any]], list[str]]:
    """Settings whose audits wait WAIT_S on the audit system, a client app on their own queue, and
    `count` audit tasks' arguments with their outbox rows' ids."""
    settings = worker_settings(
        database_url, redis_url, celery_task_queue=f"test-pool-{uuid.uuid4().hex[:8]}", audit_write_delay=WAIT_S
    )
    audits = [{"transaction_id": str(n), "data": {"n": n}} for n in range(count)]
    ids = [await insert_outbox_row(engine, AUDIT_LOG_TRANSACTION, audit) for audit in audits]
    return settings, create_celery_app(settings), audits, ids


async def test_hundreds_of_waiting_tasks_are_in_flight_at_once_without_a_thread_each(
    database_url: str, redis_url: str, engine: AsyncEngine
) -> None:
    settings, client, audits, ids = await _waiting_audits(database_url, redis_url, engine, TASKS)
    with start_worker(worker_env(settings), queue=settings.celery_task_queue, concurrency=TASKS + 50) as worker:
        stats = await asyncio.to_thread(client.control.inspect([worker.hostname], timeout=5).stats)
        assert stats[worker.hostname]["pool"]["implementation"] == "worker.pool:AsyncioPool"
        for task_id, audit in zip(ids, audits, strict=True):
            client.send_task(AUDIT_LOG_TRANSACTION, kwargs=audit, task_id=task_id)
        process = psutil.Process(worker.pid)
        most_in_flight = most_threads = 0
        for _ in range(int(10 * WAIT_S * 10)):  # up to ten times one task's wait, sampled every 0.1 s
            most_in_flight = max(most_in_flight, await _delivering(engine, ids))
            most_threads = max(most_threads, process.num_threads())
            if await _completed(engine, ids) == TASKS:
                break
            await asyncio.sleep(0.1)
        # The threads pool holds a thread per task in flight; this pool a few in all.
        assert most_in_flight >= TASKS * 0.9, f"at most {most_in_flight} of {TASKS} waited at once"
        assert most_threads < 40, f"the worker ran {most_threads} threads"
        assert await _completed(engine, ids) == TASKS
        results = [AsyncResult(task_id, app=client) for task_id in ids[:10]]
        assert [r.get(timeout=10)["task_id"] for r in results] == ids[:10]
    rows = await fetch(engine, "SELECT task_id, count(*) AS n FROM audit_log WHERE task_id = ANY($1) GROUP BY 1", ids)
    assert {row["task_id"]: row["n"] for row in rows} == dict.fromkeys(ids, 1)
    client.close()


async def test_a_warm_shutdown_finishes_the_tasks_in_flight_before_the_worker_exits(
    database_url: str, redis_url: str, engine: AsyncEngine
) -> None:
    settings, client, audits, ids = await _waiting_audits(database_url, redis_url, engine, 20)
    with start_worker(worker_env(settings), queue=settings.celery_task_queue, concurrency=50) as worker:
        for task_id, audit in zip(ids, audits, strict=True):
            client.send_task(AUDIT_LOG_TRANSACTION, kwargs=audit, task_id=task_id)
        for _ in range(100):
            if await _delivering(engine, ids) == len(ids):
                break
            await asyncio.sleep(0.1)
        assert await _delivering(engine, ids) == len(ids)
        worker.process.send_signal(signal.SIGTERM)  # while every task waits on the audit system
        returncode = await asyncio.to_thread(worker.process.wait, 10 * WAIT_S)
    assert returncode == 0
    assert await _completed(engine, ids) == len(ids)
    # Acknowledged, not left to be redelivered: nothing is waiting in the queue or unacknowledged.
    broker = client.backend.client  # the same Redis
    assert broker.llen(settings.celery_task_queue) == 0
    unacked = b" ".join(broker.hvals("unacked"))
    assert not [task_id for task_id in ids if task_id.encode() in unacked]
    client.close()
