"""The tasks' effects, made once per task id, and the outbox row's completion or failure.

The task id is the outbox row's id. `task_runs` records, per task id, that its effect
happened (done, with the result to return to any later delivery) or is being made under a
lease (running). Every function takes the process's pool and runs its own transaction; the
statements are core.outbox.queries'.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

from core.contract import AUDIT_LOG_TRANSACTION, SEND_TRANSACTION_EMAIL
from core.outbox import queries
from core.outbox.states import RunState

_INSERT_AUDIT = "INSERT INTO audit_log (task_id, transaction_id, data) VALUES ($1, $2, $3::text::jsonb)"


@dataclass(frozen=True)
class LeaseClaim:
    """The outcome of asking for the right to send a task's email."""

    owned: bool  # this delivery holds the lease and must send
    result: dict[str, Any] | None = None  # set when the email was already sent: return it
    retry_in: float = 0.0  # seconds until another delivery's live lease runs out


def _outbox_id(task_id: str) -> uuid.UUID | None:
    # Tasks sent by hand (celery call, tests) may carry any id and have no outbox row.
    try:
        return uuid.UUID(task_id)
    except ValueError:
        return None


async def _complete(connection: queries.Connection, task_id: str) -> None:
    outbox_id = _outbox_id(task_id)
    if outbox_id is not None:
        await queries.complete(connection, outbox_id)


async def write_audit_once(
    pool: asyncpg.Pool, *, task_id: str, transaction_id: str, data: dict[str, Any], result: dict[str, Any]
) -> dict[str, Any]:
    """Write the audit row, record the task as done and complete its outbox row, in one transaction.

    Returns `result` the first time a task id gets here, and the result stored then on every
    later delivery of the same task id, which writes nothing.
    """
    async with pool.acquire() as connection, connection.transaction():
        if not await queries.record_run_done(connection, task_id, AUDIT_LOG_TRANSACTION, result):
            stored = await queries.stored_run(connection, task_id)
            # Another delivery recorded it done, with its result.
            assert stored is not None
            assert stored.result is not None
            return stored.result
        await connection.execute(_INSERT_AUDIT, task_id, transaction_id, json.dumps(data))
        await _complete(connection, task_id)
        return result


async def claim_email_lease(pool: asyncpg.Pool, *, task_id: str, lease_seconds: float) -> LeaseClaim:
    """Ask for the right to send this task's email for `lease_seconds`.

    Exactly one of any number of concurrent deliveries of a task id gets `owned=True`; the
    others learn either that the email was sent (`result`) or how long the holder's lease lasts.
    """
    async with pool.acquire() as connection, connection.transaction():
        if await queries.claim_lease(connection, task_id, SEND_TRANSACTION_EMAIL, lease_seconds):
            return LeaseClaim(owned=True)
        stored = await queries.stored_run(connection, task_id)
        assert stored is not None  # the claim conflicted with this very row
        if stored.state == RunState.DONE:
            return LeaseClaim(owned=False, result=stored.result)
        return LeaseClaim(owned=False, retry_in=stored.lease_left)


async def release_email_lease(pool: asyncpg.Pool, *, task_id: str) -> None:
    """Give the lease up after a failed send, so the retry need not wait for it to run out."""
    async with pool.acquire() as connection:
        await queries.release_lease(connection, task_id)


async def finish_email(pool: asyncpg.Pool, *, task_id: str, result: dict[str, Any]) -> None:
    """Record the email as sent and complete its outbox row, in one transaction."""
    async with pool.acquire() as connection, connection.transaction():
        await queries.finish_run(connection, task_id, result)
        await _complete(connection, task_id)


async def mark_outbox_failed(pool: asyncpg.Pool, *, task_id: str, error: str) -> bool:
    """Mark the task's outbox row failed with `error`, unless it already completed.

    Returns whether a row was marked (False for a task id without an outbox row).
    """
    outbox_id = _outbox_id(task_id)
    if outbox_id is None:
        return False
    async with pool.acquire() as connection:
        return await queries.fail(connection, outbox_id, error)
