"""The tasks' effects, made once per task id, and the outbox row's completion or failure.

The task id is the outbox row's id. `task_runs` records, per task id, that its effect
happened (state 'done', with the result to return to any later delivery) or is being made
under a lease (state 'running'). Every function takes the engine and opens its own
transaction; all time comparisons use the database's clock, so workers on machines whose
clocks disagree still agree on who holds a lease.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from core.contract import AUDIT_LOG_TRANSACTION, SEND_TRANSACTION_EMAIL, OutboxState

MAX_ERROR_LENGTH = 2_000

_RECORD_DONE = text(
    """
    INSERT INTO task_runs (task_id, task_name, state, result, finished_at)
    VALUES (:task_id, :task_name, 'done', :result, now())
    ON CONFLICT (task_id) DO NOTHING
    RETURNING task_id
    """
).bindparams(bindparam("result", type_=JSONB))

_INSERT_AUDIT = text(
    "INSERT INTO audit_log (task_id, transaction_id, data) VALUES (:task_id, :transaction_id, :data)"
).bindparams(bindparam("data", type_=JSONB))

_STORED_RUN = text(
    """
    SELECT state, result, GREATEST(EXTRACT(EPOCH FROM lease_until - now()), 0)::float8 AS lease_left
    FROM task_runs WHERE task_id = :task_id
    """
)

# Take the lease if nobody has it, or take over one whose holder outlived it (a crashed worker).
_CLAIM_LEASE = text(
    """
    INSERT INTO task_runs (task_id, task_name, state, lease_until)
    VALUES (:task_id, :task_name, 'running', now() + make_interval(secs => :lease))
    ON CONFLICT (task_id) DO UPDATE
        SET lease_until = EXCLUDED.lease_until, started_at = now()
        WHERE task_runs.state = 'running' AND task_runs.lease_until < now()
    RETURNING task_id
    """
)

_RELEASE_LEASE = text("UPDATE task_runs SET lease_until = now() WHERE task_id = :task_id AND state = 'running'")

_FINISH_RUN = text(
    """
    UPDATE task_runs SET state = 'done', result = :result, lease_until = NULL, finished_at = now()
    WHERE task_id = :task_id
    """
).bindparams(bindparam("result", type_=JSONB))

_COMPLETE_OUTBOX = text(
    f"""
    UPDATE outbox SET state = '{OutboxState.COMPLETED}', completed_at = now()
    WHERE id = :outbox_id AND state <> '{OutboxState.COMPLETED}'
    """
).bindparams(bindparam("outbox_id", type_=UUID(as_uuid=True)))

_FAIL_OUTBOX = text(
    f"""
    UPDATE outbox SET state = '{OutboxState.FAILED}', last_error = :error
    WHERE id = :outbox_id AND state <> '{OutboxState.COMPLETED}'
    RETURNING id
    """
).bindparams(bindparam("outbox_id", type_=UUID(as_uuid=True)))


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


async def _complete_outbox(connection: AsyncConnection, task_id: str) -> None:
    outbox_id = _outbox_id(task_id)
    if outbox_id is not None:
        await connection.execute(_COMPLETE_OUTBOX, {"outbox_id": outbox_id})


async def write_audit_once(
    engine: AsyncEngine, *, task_id: str, transaction_id: str, data: dict[str, Any], result: dict[str, Any]
) -> dict[str, Any]:
    """Write the audit row, record the task as done and complete its outbox row, in one transaction.

    Returns `result` the first time a task id gets here, and the result stored then on every
    later delivery of the same task id, which writes nothing.
    """
    async with engine.begin() as connection:
        inserted = await connection.execute(
            _RECORD_DONE, {"task_id": task_id, "task_name": AUDIT_LOG_TRANSACTION, "result": result}
        )
        if inserted.first() is None:
            row = (await connection.execute(_STORED_RUN, {"task_id": task_id})).one()
            stored: dict[str, Any] = row.result
            return stored
        await connection.execute(_INSERT_AUDIT, {"task_id": task_id, "transaction_id": transaction_id, "data": data})
        await _complete_outbox(connection, task_id)
        return result


async def claim_email_lease(engine: AsyncEngine, *, task_id: str, lease_seconds: float) -> LeaseClaim:
    """Ask for the right to send this task's email for `lease_seconds`.

    Exactly one of any number of concurrent deliveries of a task id gets `owned=True`; the
    others learn either that the email was sent (`result`) or how long the holder's lease lasts.
    """
    async with engine.begin() as connection:
        claimed = await connection.execute(
            _CLAIM_LEASE, {"task_id": task_id, "task_name": SEND_TRANSACTION_EMAIL, "lease": float(lease_seconds)}
        )
        if claimed.first() is not None:
            return LeaseClaim(owned=True)
        row = (await connection.execute(_STORED_RUN, {"task_id": task_id})).one()
        if row.state == "done":
            return LeaseClaim(owned=False, result=row.result)
        return LeaseClaim(owned=False, retry_in=float(row.lease_left))


async def release_email_lease(engine: AsyncEngine, *, task_id: str) -> None:
    """Give the lease up after a failed send, so the retry need not wait for it to run out."""
    async with engine.begin() as connection:
        await connection.execute(_RELEASE_LEASE, {"task_id": task_id})


async def finish_email(engine: AsyncEngine, *, task_id: str, result: dict[str, Any]) -> None:
    """Record the email as sent and complete its outbox row, in one transaction."""
    async with engine.begin() as connection:
        await connection.execute(_FINISH_RUN, {"task_id": task_id, "result": result})
        await _complete_outbox(connection, task_id)


async def mark_outbox_failed(engine: AsyncEngine, *, task_id: str, error: str) -> bool:
    """Mark the task's outbox row failed with `error`, unless it already completed.

    Returns whether a row was marked (False for a task id without an outbox row).
    """
    outbox_id = _outbox_id(task_id)
    if outbox_id is None:
        return False
    async with engine.begin() as connection:
        marked = await connection.execute(_FAIL_OUTBOX, {"outbox_id": outbox_id, "error": error[:MAX_ERROR_LENGTH]})
        return marked.first() is not None
