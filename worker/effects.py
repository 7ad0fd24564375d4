"""The tasks' effects, made once per task id, and the outbox row's delivery tracking and completion.

The task id is the outbox row's id. `task_runs` records, per task id, that its effect happened
(done, with the result to return to any later delivery) or is being made under a lease
(running, with the lease's fencing token). Every function takes the process's pool and runs
its own statements; the statements are core.outbox.queries'.

The record of an effect never waits on the outbox row: a relay may hold that row's lock (for
milliseconds while it commits a batch, or until PostgreSQL ends a frozen relay's session). The
statement that records an effect completes the row too, unless the row is locked (SKIP LOCKED);
then the task completes it in a statement of its own, retried and, if it still cannot, left to
the next delivery or the reconciler (which completes a published row whose task recorded its
effect).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

from core.contract import AUDIT_LOG_TRANSACTION, SEND_TRANSACTION_EMAIL
from core.outbox import queries
from core.outbox.states import RunState
from worker.batching import Batched

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseClaim:
    """The outcome of asking for the right to send a task's email."""

    token: uuid.UUID | None  # set when this delivery holds the lease and must send
    result: dict[str, Any] | None = None  # set when the email was already sent: return it
    retry_in: float = 0.0  # seconds until another delivery's live lease runs out

    @property
    def owned(self) -> bool:
        return self.token is not None


def outbox_id(task_id: str) -> uuid.UUID | None:
    """The outbox row a task id names, or None for tasks sent by hand (celery call, tests)."""
    try:
        return uuid.UUID(task_id)
    except ValueError:
        return None


async def start_delivery(pool: asyncpg.Pool, *, task_id: str, lease_seconds: float) -> queries.StoredRun | None:
    """Record on the outbox row that this delivery started (alive for `lease_seconds`) and return
    the task id's record, so a duplicate can return before doing anything.

    If a relay holds the row's lock past the connection's lock_timeout (a frozen relay), the start
    is not recorded and only the record is read: the delivery goes on either way.
    """
    row_id = outbox_id(task_id)
    if row_id is not None:
        try:
            return await queries.start_delivery(Batched(pool), row_id, task_id, lease_seconds)
        except asyncpg.LockNotAvailableError:
            log.warning("delivery start not recorded: the outbox row is locked", extra={"task_id": task_id})
    async with pool.acquire() as connection:
        return await queries.stored_run(connection, task_id)


async def extend_delivery(pool: asyncpg.Pool, *, task_id: str, seconds: float) -> None:
    """Keep this delivery counted as alive for `seconds` more (it waits for a retry's countdown)."""
    row_id = outbox_id(task_id)
    if row_id is not None:
        async with pool.acquire() as connection:
            await queries.extend_delivery(connection, row_id, seconds)


async def complete_outbox(pool: asyncpg.Pool, *, task_id: str) -> None:
    """Mark the task's outbox row completed (from any state but completed: the effect happened).

    Waits for the row's lock no longer than the connection's lock_timeout.
    """
    row_id = outbox_id(task_id)
    if row_id is not None:
        async with pool.acquire() as connection:
            await queries.complete(connection, row_id)


async def write_audit_once(
    pool: asyncpg.Pool, *, task_id: str, transaction_id: str, data: dict[str, Any], result: dict[str, Any]
) -> tuple[dict[str, Any], bool]:
    """Write the audit row, record the task as done and complete the outbox row (one statement).

    Returns (result, completed): `result` the first time a task id gets here, and the result
    stored then on every later delivery of the same task id, which writes nothing; `completed`
    False when the outbox row was locked and is not completed yet (the caller completes it alone:
    the effect is recorded).
    """
    written, completed = await queries.record_audit_once(
        Batched(pool), task_id, AUDIT_LOG_TRANSACTION, result, transaction_id, data, outbox_id(task_id)
    )
    if not written:
        async with pool.acquire() as connection:
            stored = await queries.stored_run(connection, task_id)
        # Another delivery recorded it done, with its result.
        assert stored is not None
        assert stored.result is not None
        result = stored.result
    return result, completed


async def claim_email_lease(pool: asyncpg.Pool, *, task_id: str, lease_seconds: float) -> LeaseClaim:
    """Ask for the right to send this task's email for `lease_seconds`.

    Exactly one of any number of concurrent deliveries of a task id gets a token; the others
    learn either that the email was sent (`result`) or how long the holder's lease lasts.
    """
    async with pool.acquire() as connection:
        return await _claim(connection, task_id, lease_seconds)


async def _claim(connection: queries.Connection, task_id: str, lease_seconds: float) -> LeaseClaim:
    token = await queries.claim_lease(connection, task_id, SEND_TRANSACTION_EMAIL, lease_seconds)
    if token is not None:
        return LeaseClaim(token)
    stored = await queries.stored_run(connection, task_id)
    assert stored is not None  # the claim conflicted with this very row
    if stored.state == RunState.DONE:
        return LeaseClaim(None, result=stored.result)
    return LeaseClaim(None, retry_in=stored.lease_left)


async def release_email_lease(pool: asyncpg.Pool, *, task_id: str, token: uuid.UUID, maybe_sent: bool) -> bool:
    """Give the lease up after a failed send, so the retry need not wait for it to run out.

    `maybe_sent=False` records that the mail server certainly did not accept the message.
    Returns False, changing nothing, if the lease ran out and another delivery took it over.
    """
    async with pool.acquire() as connection:
        return await queries.release_lease(connection, task_id, token, maybe_sent=maybe_sent)


async def record_email_sent(pool: asyncpg.Pool, *, task_id: str, token: uuid.UUID, result: dict[str, Any]) -> bool:
    """Record the email as sent, on its own (the outbox row is completed afterwards).

    Returns False, changing nothing, if this delivery's lease was taken over by another one.
    """
    async with pool.acquire() as connection:
        return await queries.finish_run(connection, task_id, token, result)


async def finish_email(
    pool: asyncpg.Pool, *, task_id: str, token: uuid.UUID, result: dict[str, Any]
) -> tuple[bool, bool]:
    """Record the email as sent and complete the outbox row unless it is locked (one statement:
    the record never waits on the row's lock). Returns (recorded, completed): `recorded` False,
    changing nothing, if this delivery's lease was taken over; `completed` False if the row is not
    completed yet (the caller completes it alone)."""
    return await queries.finish_and_complete(Batched(pool), task_id, token, result, outbox_id(task_id))


async def begin_email(
    pool: asyncpg.Pool, *, task_id: str, lease_seconds: float
) -> tuple[dict[str, Any] | None, LeaseClaim | None]:
    """Record the delivery's start and, unless the email was already sent, ask for its lease (one
    statement). Returns (stored result, None) for a duplicate of a sent email, else (None, the claim).

    If a relay holds the outbox row's lock past lock_timeout, the start is not recorded and the
    lease is asked for alone: the delivery goes on either way."""
    row_id = outbox_id(task_id)
    if row_id is not None:
        try:
            stored, token = await queries.start_and_claim(
                Batched(pool), row_id, task_id, SEND_TRANSACTION_EMAIL, lease_seconds
            )
        except asyncpg.LockNotAvailableError:
            log.warning("delivery start not recorded: the outbox row is locked", extra={"task_id": task_id})
        else:
            if stored is not None and stored.state == RunState.DONE:
                return stored.result, None
            if token is not None:
                return None, LeaseClaim(token)
            if stored is not None:  # another delivery holds a live lease
                return None, LeaseClaim(None, retry_in=stored.lease_left)
            # A duplicate created the record after this statement's snapshot: read it below.
    async with pool.acquire() as connection:
        stored = await queries.stored_run(connection, task_id)
        if stored is not None and stored.state == RunState.DONE:
            return stored.result, None
        return None, await _claim(connection, task_id, lease_seconds)


async def stored_result(pool: asyncpg.Pool, *, task_id: str) -> dict[str, Any] | None:
    """The result recorded for the task id, if its effect is done."""
    async with pool.acquire() as connection:
        stored = await queries.stored_run(connection, task_id)
    return stored.result if stored is not None and stored.state == RunState.DONE else None


async def mark_outbox_failed(pool: asyncpg.Pool, *, task_id: str, error: str) -> bool:
    """Mark the task's outbox row failed with `error`, unless it already completed.

    Returns whether a row was marked (False for a task id without an outbox row).
    """
    row_id = outbox_id(task_id)
    if row_id is None:
        return False
    async with pool.acquire() as connection:
        return await queries.fail(connection, row_id, error)
