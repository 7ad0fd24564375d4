"""The email lease against a real worker process: a send that outlasts its lease, and waits for a
duplicate's lease that must not use up the retry budget.

Short limits: the lease is the hard time limit (4 s) and the whole send must end by the soft one
(3 s); every SMTP step is bounded by SMTP_TIMEOUT (3 s).
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractContextManager
from typing import Any

import pytest
from celery.result import AsyncResult
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from core.contract import SEND_TRANSACTION_EMAIL
from tests.support.outbox import insert_outbox_row, outbox_rows
from tests.support.smtp import SmtpSink, smtp_sink
from tests.support.waiting import until
from tests.support.workers import RunningWorker, mail_worker
from worker.celery_app import WorkerApp

pytestmark = pytest.mark.e2e

LIMITS: dict[str, Any] = {
    "celery_task_time_limit": 4,
    "celery_task_soft_time_limit": 3,
    "smtp_timeout": 3,
    "celery_visibility_timeout": 10,
    "celery_retry_backoff_max": 1,
}
EMAIL = {"email": "payer@example.com", "amount": "12.50", "status": "SUCCESS"}


def _worker(
    database_url: str, redis_url: str, sink: SmtpSink, **overrides: Any
) -> AbstractContextManager[tuple[WorkerApp, RunningWorker]]:
    return mail_worker(database_url, redis_url, smtp_host=sink.host, smtp_port=sink.port, **{**LIMITS, **overrides})


async def _state(engine: AsyncEngine, outbox_id: str) -> str:
    (row,) = await outbox_rows(engine, "id = $1::uuid", outbox_id)
    return row.state


async def test_an_email_slower_than_its_lease_and_a_duplicate_delivery_send_one_email(
    database_url: str, redis_url: str, engine: AsyncEngine
) -> None:
    # The first send meets a server that takes 3 s at MAIL and 3 s at RCPT: each step within
    # SMTP_TIMEOUT (3.5 s), 6 s together, well past the 4 s lease. A duplicate arrives a second
    # later and, once the lease runs out, would take it over and send while the first still sends.
    with smtp_sink(step_delay=3.0, slow_sessions=1) as sink:
        with mail_worker(
            database_url, redis_url, smtp_host=sink.host, smtp_port=sink.port, **{**LIMITS, "smtp_timeout": 3.5}
        ) as (client, worker):
            outbox_id = await insert_outbox_row(engine, SEND_TRANSACTION_EMAIL, EMAIL)
            client.send_task(SEND_TRANSACTION_EMAIL, kwargs=EMAIL, task_id=outbox_id)
            await until(lambda: sink.mails >= 1, 15, "the first delivery's send reaching MAIL")
            client.send_task(SEND_TRANSACTION_EMAIL, kwargs=EMAIL, task_id=outbox_id)
            result = await asyncio.to_thread(AsyncResult(outbox_id, app=client).get, timeout=30)
            await asyncio.to_thread(
                worker.wait_for_log, f"{SEND_TRANSACTION_EMAIL}[{outbox_id}] succeeded", count=2, timeout=30
            )
            log = worker.log()
        assert result["task_id"] == outbox_id
        assert sink.count == 1, "the email went out twice"
        assert sink.mails == 2  # the slow send was cut at its deadline, before its data; one more sent it
        assert sink.started == 1
        assert "SendDeadlineExceeded" in log
        assert await _state(engine, outbox_id) == "completed"


async def test_waiting_for_a_duplicates_lease_does_not_use_up_the_retry_budget(
    database_url: str, redis_url: str, engine: AsyncEngine
) -> None:
    # Another delivery holds the lease for 4 s: the task waits for it about four times (the waits
    # are at most CELERY_RETRY_BACKOFF_MAX = 1 s apart), more than its whole retry budget (1).
    # Then its first send meets a temporary refusal: that one transient failure must be retried.
    with smtp_sink(refuse_first=1) as sink:
        with mail_worker(
            database_url,
            redis_url,
            smtp_host=sink.host,
            smtp_port=sink.port,
            **{**LIMITS, "celery_task_max_retries": 1},
        ) as (client, worker):
            outbox_id = await insert_outbox_row(engine, SEND_TRANSACTION_EMAIL, EMAIL)
            async with engine.begin() as connection:
                await connection.execute(
                    text(
                        "INSERT INTO task_runs (task_id, task_name, state, lease_until, lease_token) "
                        "VALUES (:id, :name, 'running', now() + interval '4 seconds', gen_random_uuid())"
                    ),
                    {"id": outbox_id, "name": SEND_TRANSACTION_EMAIL},
                )
            client.send_task(SEND_TRANSACTION_EMAIL, kwargs=EMAIL, task_id=outbox_id)
            result = await asyncio.to_thread(AsyncResult(outbox_id, app=client).get, timeout=40)
            log = worker.log()
        assert result["task_id"] == outbox_id
        assert log.count("another delivery holds the lease") >= 2
        assert "transient failure, retry 1/1" in log
        assert sink.count == 1
        assert await _state(engine, outbox_id) == "completed"
