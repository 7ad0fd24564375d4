"""Every statement that reads or writes the `outbox` and `task_runs` tables, one function each.

All of them run on an asyncpg connection handed in by the caller, inside the caller's
transaction when they need one (each docstring says so); none commits. States come from
core.outbox.states and every state change is one of OUTBOX_TRANSITIONS. Times are the
database's clock, so processes on machines whose clocks disagree still agree on deadlines
and leases.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol
from uuid import UUID

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from core.contract import OUTBOX_CHANNEL, SEND_TRANSACTION_EMAIL, TaskMessage
from core.outbox.states import ALL_OUTBOX_STATES, OutboxState, RunState

S = OutboxState
# A connection of its own or one lent by a pool: the statements run on either.
Connection = asyncpg.Connection | PoolConnectionProxy


class RowSource(Protocol):
    """Where a statement of ONE_ROW can run: a connection, or the worker's batches of concurrent
    calls (worker.batching), which match rows to callers by position."""

    async def fetchrow(self, query: str, *args: Any) -> Any: ...


MAX_ERROR_LENGTH = 2_000


# --- Writing a transfer's messages -------------------------------------------------------------


def insert_messages_sql(*, first_param: int, transaction_param: int | None) -> str:
    """The INSERT of a use case's messages, for the use case to end its own statement with.

    The transfer writes its transaction and its messages in one statement (one round trip), so
    it composes this text after its own CTEs. Parameters first_param.. first_param+3 are what
    message_arguments() returns (three arrays, then the traceparent every row of the statement
    shares); transaction_param (if any) is the transaction's id.
    """
    ids, names, kwargs, traceparent = (f"${first_param + offset}" for offset in range(4))
    transaction = f"${transaction_param}" if transaction_param is not None else "NULL::uuid"
    return f"""
INSERT INTO outbox (id, task_name, kwargs, transaction_id, traceparent)
SELECT message.id, message.task_name, message.kwargs::jsonb, {transaction}, {traceparent}::text
FROM unnest({ids}::uuid[], {names}::text[], {kwargs}::text[]) AS message (id, task_name, kwargs)
"""


def message_arguments(
    ids: Sequence[UUID], messages: Sequence[TaskMessage], traceparent: str | None = None
) -> list[Any]:
    """What insert_messages_sql() binds: ids, task names, kwargs as JSON text, and the W3C
    `traceparent` of the span writing them (core.telemetry.current_traceparent(); None for none)."""
    return [list(ids), [m.task_name for m in messages], [json.dumps(m.kwargs) for m in messages], traceparent]


_INSERT_MESSAGES = insert_messages_sql(first_param=1, transaction_param=5)


async def insert_messages(
    connection: Connection,
    ids: Sequence[UUID],
    messages: Sequence[TaskMessage],
    transaction_id: UUID | None,
    traceparent: str | None = None,
) -> None:
    """Write messages as pending rows (for writers other than the transfer: deposits, the bench)."""
    await connection.execute(_INSERT_MESSAGES, *message_arguments(ids, messages, traceparent), transaction_id)


_NOTIFY = "SELECT pg_notify($1, '')"


async def notify(connection: Connection) -> None:
    """Wake the relays at the commit of the caller's transaction."""
    await connection.execute(_NOTIFY, OUTBOX_CHANNEL)


@dataclass(frozen=True, slots=True)
class MessageView:
    """An outbox row as the API shows it."""

    id: UUID
    task_name: str
    state: str
    attempts: int
    republishes: int
    last_error: str | None
    created_at: datetime
    published_at: datetime | None
    completed_at: datetime | None


_MESSAGES_OF_TRANSACTION = """
SELECT id, task_name, state, attempts, republishes, last_error, created_at, published_at, completed_at
FROM outbox WHERE transaction_id = $1 ORDER BY task_name
"""


async def messages_of_transaction(connection: Connection, transaction_id: UUID) -> list[MessageView]:
    """The outbox rows a transaction wrote, by task name."""
    return [MessageView(**dict(r)) for r in await connection.fetch(_MESSAGES_OF_TRANSACTION, transaction_id)]


# --- The relay: claim, mark published, record failures -----------------------------------------


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A claimed row: what the publisher needs, and how many attempts it already had."""

    id: UUID
    task_name: str
    kwargs: Any  # decoded JSON; a publisher rejects anything but an object
    attempts: int
    decode_error: str | None = None  # set when the stored kwargs are JSON Python cannot read
    created_at: datetime | None = None  # the commit of the row (publish latency, the worker's completion latency)
    traceparent: str | None = None  # the W3C trace context of the request that wrote it


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed publish attempt of one row, and how long to wait before the next."""

    row: OutboxRow
    error: str
    delay: float


# Filtered and ordered on the leading column of ix_outbox_due, so the scan walks the index from
# the oldest due row and stops after `limit` rows: rows waiting in backoff (due later) are never
# read, however many there are. A fresh row is due at its commit, so this is oldest first for
# rows that never failed; a retried row takes its place when its retry falls due.
_CLAIM = f"""
SELECT id, task_name, kwargs::text AS kwargs, attempts, created_at, traceparent
FROM outbox
WHERE state = '{S.PENDING}' AND next_attempt_at <= now()
ORDER BY next_attempt_at, created_at
LIMIT $1
FOR UPDATE SKIP LOCKED
"""


# The claim's filter with no lock, no order and no transaction: a poll that finds nothing due costs
# this one round trip instead of a BEGIN, a claim and a COMMIT. A row another relay holds still
# counts here (its lock is not visible to a plain read); the poll then claims and finds nothing.
_ANY_DUE = f"SELECT EXISTS (SELECT 1 FROM outbox WHERE state = '{S.PENDING}' AND next_attempt_at <= now())"


async def any_due(connection: Connection) -> bool:
    """Whether any pending row is due, locked or not: the cheap question before a speculative claim."""
    return bool(await connection.fetchval(_ANY_DUE))


async def claim_pending(connection: Connection, limit: int) -> list[OutboxRow]:
    """Lock up to `limit` due pending rows, in the order they fell due, skipping rows other relays hold.

    Must run inside a transaction; the locks last until it ends. Never raises for a row whose
    kwargs Python cannot decode: that row comes back with `decode_error` set.
    """
    return [_claimed(r) for r in await connection.fetch(_CLAIM, limit)]


def _claimed(record: asyncpg.Record) -> OutboxRow:
    # Decoded row by row: PostgreSQL accepts JSON that Python refuses (a 5,000-digit number, deep
    # nesting), and one such row must fail alone rather than the whole claim.
    created_at, traceparent = record["created_at"], record["traceparent"]
    try:
        kwargs = json.loads(record["kwargs"])
    except (ValueError, RecursionError) as exc:
        error = f"undecodable kwargs: {exc}"
        return OutboxRow(record["id"], record["task_name"], None, record["attempts"], error, created_at, traceparent)
    return OutboxRow(record["id"], record["task_name"], kwargs, record["attempts"], None, created_at, traceparent)


_MARK_PUBLISHED = f"""
UPDATE outbox
SET state = '{S.PUBLISHED}', published_at = clock_timestamp(), attempts = attempts + 1
WHERE id = ANY($1::uuid[]) AND state = '{S.PENDING}'
"""


async def mark_published(connection: Connection, ids: Sequence[UUID]) -> None:
    """Record that the broker accepted these claimed rows (published, published_at, attempts + 1)."""
    if ids:
        await connection.execute(_MARK_PUBLISHED, list(ids))


_RECORD_FAILURES = f"""
UPDATE outbox AS o
SET attempts = o.attempts + 1,
    last_error = f.error,
    next_attempt_at = now() + make_interval(secs => f.delay),
    state = CASE WHEN o.attempts + 1 >= $4 THEN '{S.DEAD}' ELSE '{S.PENDING}' END
FROM unnest($1::uuid[], $2::text[], $3::float8[]) AS f(id, error, delay)
WHERE o.id = f.id AND o.state = '{S.PENDING}'
RETURNING o.id, o.state, o.attempts
"""


async def record_failures(
    connection: Connection, failures: Sequence[Failure], max_attempts: int
) -> dict[UUID, tuple[str, int]]:
    """Count a failed attempt per claimed row, keep its error, schedule its retry; dead at max_attempts.

    Returns each row's new (state, attempts).
    """
    if not failures:
        return {}
    records = await connection.fetch(
        _RECORD_FAILURES,
        [f.row.id for f in failures],
        [f.error[:MAX_ERROR_LENGTH] for f in failures],
        [f.delay for f in failures],
        max_attempts,
    )
    return {r["id"]: (r["state"], r["attempts"]) for r in records}


_MARK_DEAD = f"""
UPDATE outbox AS o
SET state = '{S.DEAD}', last_error = d.reason
FROM unnest($1::uuid[], $2::text[]) AS d(id, reason)
WHERE o.id = d.id AND o.state = '{S.PENDING}'
"""


async def mark_dead(connection: Connection, poison: Sequence[tuple[UUID, str]]) -> None:
    """Mark claimed pending rows dead at once, each with its reason (rows no publish could fix)."""
    if poison:
        await connection.execute(
            _MARK_DEAD, [row_id for row_id, _ in poison], [reason[:MAX_ERROR_LENGTH] for _, reason in poison]
        )


# --- The reconciler: published rows that never completed ---------------------------------------


class Evidence(StrEnum):
    """Why the reconciler changed a published row: what it saw, not merely how old the row is."""

    EFFECT_RECORDED = "effect recorded"  # task_runs says done: the row is completed, not re-published
    LEASE_RAN_OUT = "delivery lease ran out"  # a delivery started and stopped renewing its lease
    QUEUE_EMPTY = "queue empty"  # the broker's queue held no message and no worker held this one
    QUEUE_PASSED = "queue moved past it"  # workers finished messages published well after it


@dataclass(frozen=True, slots=True)
class Reconciled:
    id: UUID
    task_name: str
    state: str
    republishes: int
    evidence: Evidence


@dataclass(frozen=True, slots=True)
class QueueObservation:
    """What the broker showed just before the reconciler looked at the rows.

    empty: True if the queue held no message, False if it held some, None if the broker could not
    be asked. held: ids of messages workers have taken but not acknowledged (None if unknown).
    """

    empty: bool | None
    held: frozenset[UUID] | None


# The evidence, per overdue published row, in order (the first that applies decides; NULL: leave it):
# 1. its task recorded its effect in task_runs -> complete the row (its completion UPDATE was lost);
# 2. an email lease on it is live -> a delivery is sending: leave it;
# 3. a delivery started: re-publish only once that delivery's lease ran out;
# 4. a worker holds its message unacknowledged (not started yet) -> leave it;
# 5. never started, and the queue is empty -> its message is gone;
# 6. never started, and the latest completions were of messages published more than $6 seconds
#    after it: the queue, first in first out, moved past it -> its message is gone.
# Otherwise it is waiting in the queue and is left alone, however long it waits. $4 and $5 are
# read from the broker *before* this statement, so a message taken meanwhile shows as started.
_EVIDENCE = f"""
CASE
    WHEN r.state = '{RunState.DONE}' THEN '{Evidence.EFFECT_RECORDED}'
    WHEN r.state = '{RunState.RUNNING}' AND r.lease_until > now() THEN NULL
    WHEN o.delivery_started_at IS NOT NULL THEN
        CASE WHEN o.delivery_lease_until < now() THEN '{Evidence.LEASE_RAN_OUT}' END
    WHEN o.id = ANY($5::uuid[]) THEN NULL
    WHEN $4::boolean THEN '{Evidence.QUEUE_EMPTY}'
    WHEN o.published_at < (
        SELECT max(recent.published_at) FROM (
            SELECT published_at FROM outbox WHERE state = '{S.COMPLETED}' ORDER BY completed_at DESC LIMIT $7
        ) AS recent
    ) - make_interval(secs => $6) THEN '{Evidence.QUEUE_PASSED}'
END"""
_REPUBLISH = f"(c.evidence <> '{Evidence.EFFECT_RECORDED}' AND o.republishes < $3)"
# attempts restarts at 0: it counts the publish attempts of the current round, so a short broker
# outage right after a re-publish does not use up the budget earlier rounds spent. The delivery
# columns are cleared so that the new message's delivery is judged on its own.
_RECONCILE = f"""
WITH chosen AS (
    SELECT o.id, {_EVIDENCE} AS evidence
    FROM outbox AS o LEFT JOIN task_runs AS r ON r.task_id = o.id::text
    WHERE o.state = '{S.PUBLISHED}' AND o.published_at < now() - make_interval(secs => $1)
      AND ({_EVIDENCE}) IS NOT NULL
    ORDER BY o.published_at
    LIMIT $2
    FOR UPDATE OF o SKIP LOCKED
)
UPDATE outbox AS o
SET state = CASE WHEN c.evidence = '{Evidence.EFFECT_RECORDED}' THEN '{S.COMPLETED}'
                 WHEN o.republishes >= $3 THEN '{S.DEAD}' ELSE '{S.PENDING}' END,
    completed_at = CASE WHEN c.evidence = '{Evidence.EFFECT_RECORDED}' THEN now() ELSE o.completed_at END,
    republishes = CASE WHEN {_REPUBLISH} THEN o.republishes + 1 ELSE o.republishes END,
    attempts = CASE WHEN {_REPUBLISH} THEN 0 ELSE o.attempts END,
    next_attempt_at = CASE WHEN {_REPUBLISH} THEN now() ELSE o.next_attempt_at END,
    delivery_started_at = CASE WHEN {_REPUBLISH} THEN NULL ELSE o.delivery_started_at END,
    delivery_lease_until = CASE WHEN {_REPUBLISH} THEN NULL ELSE o.delivery_lease_until END,
    last_error = CASE WHEN c.evidence = '{Evidence.EFFECT_RECORDED}' THEN o.last_error
                      WHEN o.republishes >= $3
                          THEN 'message gone after ' || o.republishes || ' re-publishes: ' || c.evidence
                      ELSE 're-published: ' || c.evidence END
FROM chosen AS c
WHERE o.id = c.id
RETURNING o.id, o.task_name, o.state, o.republishes, c.evidence
"""


async def reconcile_published(
    connection: Connection,
    *,
    deadline: float,
    limit: int,
    max_republishes: int,
    queue: QueueObservation,
    order_margin: float,
    recent_completions: int = 100,
) -> list[Reconciled]:
    """Judge up to `limit` rows published more than `deadline` seconds ago, on evidence (see _EVIDENCE).

    A row whose message is gone goes back to pending (re-published with the same task id), or to
    dead once it was re-published `max_republishes` times; a row whose task recorded its effect
    is completed. Rows waiting in the queue are left alone however old they are. `queue` must be
    observed before this call. One statement; safe on every relay at once (SKIP LOCKED).
    """
    held = list(queue.held) if queue.held is not None else []
    records = await connection.fetch(
        _RECONCILE, deadline, limit, max_republishes, queue.empty, held, order_margin, recent_completions
    )
    return [Reconciled(r["id"], r["task_name"], r["state"], r["republishes"], Evidence(r["evidence"])) for r in records]


# --- The worker: task runs, completion, failure -------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredRun:
    state: RunState
    result: dict[str, Any] | None
    lease_left: float  # seconds until the holder's lease runs out (0 when it has)


_RECORD_DONE = f"""
INSERT INTO task_runs (task_id, task_name, state, result, finished_at)
VALUES ($1, $2, '{RunState.DONE}', $3::text::jsonb, now())
ON CONFLICT (task_id) DO NOTHING
RETURNING task_id
"""


async def record_run_done(connection: Connection, task_id: str, task_name: str, result: dict[str, Any]) -> bool:
    """Record a task id's effect as made, unless some delivery recorded it first.

    Returns True if this call recorded it. Run it in the transaction that makes the effect.
    """
    return await connection.fetchval(_RECORD_DONE, task_id, task_name, json.dumps(result)) is not None


def _complete_unless_locked(outbox_param: str, *, when: str = "true") -> str:
    """CTEs that complete the outbox row `outbox_param` (if `when`) within the caller's statement,
    unless another transaction holds the row's lock: a relay commits its batch in milliseconds, but
    a frozen relay holds it until PostgreSQL ends its session, and recording an effect must never
    wait on that. `row_completed` (see _ROW_COMPLETED) then says whether the caller still has to."""
    return f"""
free AS (
    SELECT id FROM outbox WHERE id = {outbox_param} AND state <> '{S.COMPLETED}' AND ({when})
    FOR UPDATE SKIP LOCKED
), completed AS (
    UPDATE outbox SET state = '{S.COMPLETED}', completed_at = now() FROM free WHERE outbox.id = free.id
    RETURNING outbox.id
)"""


def _row_completed(outbox_param: str) -> str:
    """True when the row is completed after the statement: by it, or before it (or there is no row)."""
    return f"""(EXISTS (SELECT 1 FROM completed)
    OR NOT EXISTS (SELECT 1 FROM outbox WHERE id = {outbox_param} AND state <> '{S.COMPLETED}')) AS row_completed"""


# The audit row, the task id's record and the outbox row's completion in one statement (one round
# trip): the record inserted here is what makes the audit row's INSERT happen at all.
_RECORD_AUDIT = f"""
WITH done AS (
    INSERT INTO task_runs (task_id, task_name, state, result, finished_at)
    VALUES ($1, $2, '{RunState.DONE}', $3::text::jsonb, now())
    ON CONFLICT (task_id) DO NOTHING
    RETURNING task_id
), written AS (
    INSERT INTO audit_log (task_id, transaction_id, data) SELECT $1, $4, $5::text::jsonb FROM done
), {_complete_unless_locked("$6::uuid")}
SELECT (SELECT count(*) FROM done) > 0 AS written, {_row_completed("$6::uuid")}
"""


async def record_audit_once(
    connection: RowSource,
    task_id: str,
    task_name: str,
    result: dict[str, Any],
    transaction_id: str,
    data: dict[str, Any],
    outbox_id: UUID | None,
) -> tuple[bool, bool]:
    """Write the audit row and record the task id's effect as made, unless some delivery recorded
    it first, and complete the outbox row unless it is locked. One statement, so no transaction is
    needed. Returns (written: this call wrote them, row completed: nothing left to complete)."""
    row = await connection.fetchrow(
        _RECORD_AUDIT, task_id, task_name, json.dumps(result), transaction_id, json.dumps(data), outbox_id
    )
    assert row is not None
    return bool(row["written"]), bool(row["row_completed"])


_STORED_RUN = """
SELECT state, result::text AS result, GREATEST(EXTRACT(EPOCH FROM lease_until - now()), 0)::float8 AS lease_left
FROM task_runs WHERE task_id = $1
"""


async def stored_run(connection: Connection, task_id: str) -> StoredRun | None:
    """The task id's record, or None if no delivery has recorded anything."""
    return _stored(await connection.fetchrow(_STORED_RUN, task_id))


def _stored(row: asyncpg.Record | None) -> StoredRun | None:
    if row is None:
        return None
    result = json.loads(row["result"]) if row["result"] is not None else None
    return StoredRun(RunState(row["state"]), result, float(row["lease_left"] or 0.0))


# One round trip at the start of every delivery: record on the outbox row that a delivery started
# and until when it counts as alive (the reconciler leaves a started row alone until then), and
# read the task id's record, so a duplicate returns before doing any work. Only unfinished rows
# are touched; none of these columns is indexed, so the update is a cheap HOT update.
_STARTED = f"""started AS (
    UPDATE outbox
    SET delivery_started_at = now(), delivery_lease_until = now() + make_interval(secs => $3),
        deliveries = deliveries + 1
    WHERE id = $1 AND state IN ('{S.PENDING}', '{S.PUBLISHED}')
)"""
# One row always (state NULL: no record), so that it can be batched (ONE_ROW).
_START_DELIVERY = f"""
WITH {_STARTED}
SELECT r.state, r.result::text AS result,
    GREATEST(EXTRACT(EPOCH FROM r.lease_until - now()), 0)::float8 AS lease_left
FROM (SELECT 1) AS one LEFT JOIN task_runs AS r ON r.task_id = $2
"""


async def start_delivery(
    connection: RowSource, outbox_id: UUID, task_id: str, lease_seconds: float
) -> StoredRun | None:
    """Record that a delivery of the row's message starts, alive for `lease_seconds`; return the
    task id's record (None if no delivery recorded anything).

    Waits for the outbox row's lock (a relay commits its batch in milliseconds): the caller's
    lock_timeout bounds the wait, and asyncpg.LockNotAvailableError then means nothing was written.
    """
    row = await connection.fetchrow(_START_DELIVERY, outbox_id, task_id, float(lease_seconds))
    return _stored(row) if row["state"] is not None else None


_EXTEND_DELIVERY = f"""
UPDATE outbox SET delivery_lease_until = GREATEST(delivery_lease_until, now() + make_interval(secs => $2))
WHERE id = $1 AND state IN ('{S.PENDING}', '{S.PUBLISHED}') AND delivery_started_at IS NOT NULL
"""


async def extend_delivery(connection: Connection, outbox_id: UUID, seconds: float) -> None:
    """Keep a started delivery alive for at least `seconds` more (a retry waiting for its countdown)."""
    await connection.execute(_EXTEND_DELIVERY, outbox_id, float(seconds))


# Take the lease if nobody has it, or take over one whose holder outlived it (a crashed worker).
# Each lease gets a fresh fencing token; only its holder can release or finish it. Taking it also
# counts a send whose outcome is unknown until the holder finishes or proves nothing was sent.
def _claim_lease_sql(task_id: str, task_name: str, seconds: str) -> str:
    return f"""
INSERT INTO task_runs (task_id, task_name, state, lease_until, lease_token, sends_in_doubt)
VALUES ({task_id}, {task_name}, '{RunState.RUNNING}', now() + make_interval(secs => {seconds}), gen_random_uuid(), 1)
ON CONFLICT (task_id) DO UPDATE
    SET lease_until = EXCLUDED.lease_until, lease_token = EXCLUDED.lease_token, started_at = now(),
        sends_in_doubt = task_runs.sends_in_doubt + 1
    WHERE task_runs.state = '{RunState.RUNNING}' AND task_runs.lease_until < now()
RETURNING lease_token"""


_CLAIM_LEASE = _claim_lease_sql("$1", "$2", "$3")


# start_delivery and claim_lease in one round trip, for the email: `stored` is the record as the
# statement found it (as start_delivery returns it); `token` is set if this delivery took the lease.
_START_AND_CLAIM = f"""
WITH {_STARTED}, claimed AS ({_claim_lease_sql("$2", "$4", "$3")}
)
SELECT r.state, r.result::text AS result,
    GREATEST(EXTRACT(EPOCH FROM r.lease_until - now()), 0)::float8 AS lease_left,
    (SELECT lease_token FROM claimed) AS token
FROM (SELECT 1) AS one LEFT JOIN task_runs AS r ON r.task_id = $2
"""


async def start_and_claim(
    connection: RowSource, outbox_id: UUID, task_id: str, task_name: str, lease_seconds: float
) -> tuple[StoredRun | None, UUID | None]:
    """start_delivery() then claim_lease() (both for `lease_seconds`), in one statement: the task
    id's record as it was (None if none), and the lease's token if this delivery took it.

    Waits for the outbox row's lock like start_delivery (asyncpg.LockNotAvailableError: nothing
    was written, and the caller claims without recording the start)."""
    row = await connection.fetchrow(_START_AND_CLAIM, outbox_id, task_id, float(lease_seconds), task_name)
    assert row is not None
    return (_stored(row) if row["state"] is not None else None), row["token"]


async def claim_lease(connection: Connection, task_id: str, task_name: str, seconds: float) -> UUID | None:
    """Take the lease on making this task id's effect for `seconds` (database clock).

    Returns the lease's fencing token, or None if another delivery holds a live lease or the
    effect is already recorded.
    """
    token: UUID | None = await connection.fetchval(_CLAIM_LEASE, task_id, task_name, float(seconds))
    return token


_RELEASE_LEASE = f"""
UPDATE task_runs
SET lease_until = now(), lease_token = NULL,
    sends_in_doubt = sends_in_doubt - CASE WHEN $3 THEN 0 ELSE 1 END
WHERE task_id = $1 AND state = '{RunState.RUNNING}' AND lease_token = $2
RETURNING task_id
"""


async def release_lease(connection: Connection, task_id: str, token: UUID, *, maybe_sent: bool) -> bool:
    """End the lease `token` holds now, so the next delivery need not wait for it to run out.

    `maybe_sent=False` says the send certainly did not happen. Does nothing (returns False) if the
    lease ran out and another delivery took it over: a stale holder cannot end its successor's lease.
    """
    return await connection.fetchval(_RELEASE_LEASE, task_id, token, maybe_sent) is not None


_FINISH_RUN = f"""
UPDATE task_runs SET state = '{RunState.DONE}', result = $3::text::jsonb, lease_until = NULL, lease_token = NULL,
    finished_at = now()
WHERE task_id = $1 AND state = '{RunState.RUNNING}' AND lease_token = $2
RETURNING task_id
"""
# finish_run, then the outbox row's completion unless it is locked, in one statement.
_FINISH_AND_COMPLETE = f"""
WITH finished AS ({_FINISH_RUN.strip()}
), {_complete_unless_locked("$4::uuid", when="EXISTS (SELECT 1 FROM finished)")}
SELECT EXISTS (SELECT 1 FROM finished) AS recorded, {_row_completed("$4::uuid")}
"""


async def finish_run(connection: Connection, task_id: str, token: UUID, result: dict[str, Any]) -> bool:
    """Record the leased effect as made, with the result later deliveries return.

    Acts only on the lease `token` holds: returns False (nothing written) if that lease was
    taken over by another delivery or the effect was recorded by another delivery.
    """
    return await connection.fetchval(_FINISH_RUN, task_id, token, json.dumps(result)) is not None


async def finish_and_complete(
    connection: RowSource, task_id: str, token: UUID, result: dict[str, Any], outbox_id: UUID | None
) -> tuple[bool, bool]:
    """finish_run(), then complete the outbox row unless it is locked, in one statement. Returns
    (recorded: as finish_run, row completed: nothing left to complete; False when not recorded)."""
    row = await connection.fetchrow(_FINISH_AND_COMPLETE, task_id, token, json.dumps(result), outbox_id)
    assert row is not None
    return bool(row["recorded"]), bool(row["recorded"] and row["row_completed"])


# The statements of every delivery that always return exactly one row: the worker batches
# concurrent calls of each (worker.batching), matching rows to calls by position.
ONE_ROW = frozenset({_START_DELIVERY, _START_AND_CLAIM, _RECORD_AUDIT, _FINISH_AND_COMPLETE})


_COMPLETE = f"""
UPDATE outbox SET state = '{S.COMPLETED}', completed_at = now()
WHERE id = $1 AND state <> '{S.COMPLETED}'
"""


async def complete(connection: Connection, outbox_id: UUID) -> None:
    """Mark the row completed (from any state but completed: the effect happened)."""
    await connection.execute(_COMPLETE, outbox_id)


_FAIL = f"""
UPDATE outbox SET state = '{S.FAILED}', last_error = $2
WHERE id = $1 AND state IN ('{S.PENDING}', '{S.PUBLISHED}')
RETURNING id
"""


async def fail(connection: Connection, outbox_id: UUID, error: str) -> bool:
    """Mark the row failed with `error`, unless it completed or was given up already.

    Returns whether a row was marked.
    """
    return await connection.fetchval(_FAIL, outbox_id, error[:MAX_ERROR_LENGTH]) is not None


# --- Operators: status, dead letters, replay, purge --------------------------------------------

_COUNTS = "SELECT state, count(*) AS n FROM outbox GROUP BY state"


async def state_counts(connection: Connection) -> dict[str, int]:
    """Rows per state (every state present, zero included)."""
    counts = dict.fromkeys(ALL_OUTBOX_STATES, 0)
    counts.update({r["state"]: r["n"] for r in await connection.fetch(_COUNTS)})
    return {str(state): n for state, n in counts.items()}


_FIGURES = f"""
SELECT
  (SELECT extract(epoch FROM now() - min(created_at)) FROM outbox WHERE state = '{S.PENDING}')
      AS oldest_pending_s,
  (SELECT extract(epoch FROM now() - min(published_at)) FROM outbox WHERE state = '{S.PUBLISHED}')
      AS oldest_published_s,
  (SELECT count(*) FROM outbox WHERE published_at > now() - interval '1 minute') AS published_last_minute,
  (SELECT count(*) FROM outbox WHERE state = '{S.COMPLETED}' AND completed_at > now() - interval '1 minute')
      AS completed_last_minute
"""


async def figures(connection: Connection) -> dict[str, Any]:
    """Oldest pending and published ages (seconds, None when there is none) and last-minute counts."""
    row = await connection.fetchrow(_FIGURES)
    assert row is not None  # an aggregate query always returns its one row
    return dict(row)


_LATENCY = f"""
SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY extract(epoch FROM completed_at - created_at))
FROM outbox WHERE state = '{S.COMPLETED}' AND completed_at > now() - interval '1 minute'
"""


async def completion_latency(connection: Connection) -> tuple[float, float] | None:
    """commit->completed p50 and p99 in seconds over the last minute, or None if nothing completed."""
    value = await connection.fetchval(_LATENCY)
    return None if value is None else (float(value[0]), float(value[1]))


@dataclass(frozen=True, slots=True)
class GivenUp:
    id: UUID
    state: str
    task_name: str
    attempts: int
    republishes: int
    last_error: str | None
    created_at: datetime


_GIVEN_UP = f"""
SELECT id, state, task_name, attempts, republishes, last_error, created_at
FROM outbox WHERE state IN ('{S.DEAD}', '{S.FAILED}')
ORDER BY created_at LIMIT $1
"""


async def given_up(connection: Connection, limit: int) -> list[GivenUp]:
    """Dead and failed rows, oldest first."""
    return [GivenUp(**dict(r)) for r in await connection.fetch(_GIVEN_UP, limit)]


# An email whose send may have happened: a lease was taken to send it and no delivery finished
# or proved that nothing was sent (a worker that died mid-send, a reply lost after the data).
# Replaying it sends it again; the operator must say so (--force).
_IN_DOUBT = f"""
EXISTS (SELECT 1 FROM task_runs AS r
        WHERE r.task_id = outbox.id::text AND r.task_name = '{SEND_TRANSACTION_EMAIL}'
          AND r.state = '{RunState.RUNNING}' AND r.sends_in_doubt > 0)"""
_REPLAY_RESET = f"""
SET state = '{S.PENDING}', attempts = 0, republishes = 0, next_attempt_at = now(),
    published_at = NULL, completed_at = NULL, last_error = $2,
    delivery_started_at = NULL, delivery_lease_until = NULL"""
_REPLAY = f"""
UPDATE outbox {_REPLAY_RESET}
WHERE id = ANY($1::uuid[]) AND state IN ('{S.DEAD}', '{S.FAILED}') AND NOT ($3 AND {_IN_DOUBT})
RETURNING id
"""
_REPLAY_STATES = f"""
UPDATE outbox {_REPLAY_RESET}
WHERE state = ANY($1::text[]) AND state IN ('{S.DEAD}', '{S.FAILED}') AND NOT ($3 AND {_IN_DOUBT})
RETURNING id
"""


async def replay(
    connection: Connection,
    *,
    ids: Sequence[UUID] = (),
    states: Sequence[OutboxState] = (),
    reason: str,
    spare_in_doubt: bool = True,
) -> set[UUID]:
    """Put dead or failed rows (the given ids, or every row in `states`) back to pending with fresh
    counters. Returns the ids replayed; others are left alone, and so are emails whose send may
    have happened (see in_doubt()) unless `spare_in_doubt` is False. Run it in a transaction with
    notify()."""
    if ids:
        records = await connection.fetch(_REPLAY, list(ids), reason, spare_in_doubt)
    else:
        records = await connection.fetch(_REPLAY_STATES, [str(s) for s in states], reason, spare_in_doubt)
    return {r["id"] for r in records}


@dataclass(frozen=True, slots=True)
class InDoubt:
    id: UUID
    last_send_started_at: datetime
    sends_in_doubt: int


_IN_DOUBT_ROWS = f"""
SELECT outbox.id, r.started_at AS last_send_started_at, r.sends_in_doubt
FROM outbox JOIN task_runs AS r ON r.task_id = outbox.id::text
WHERE (outbox.id = ANY($1::uuid[]) OR outbox.state = ANY($2::text[]))
  AND outbox.state IN ('{S.DEAD}', '{S.FAILED}') AND {_IN_DOUBT}
ORDER BY outbox.created_at
"""


async def in_doubt(
    connection: Connection, *, ids: Sequence[UUID] = (), states: Sequence[OutboxState] = ()
) -> list[InDoubt]:
    """The dead or failed email rows among `ids` (or in `states`) whose send may have happened."""
    records = await connection.fetch(_IN_DOUBT_ROWS, list(ids), [str(s) for s in states])
    return [InDoubt(**dict(r)) for r in records]


# Short statements, each deleting at most `limit` rows (oldest completions first, on
# ix_outbox_completed) and skipping rows someone holds, with their task_runs records. Only
# completed rows: a published row is still tracked by the reconciler until its task completes,
# and dead or failed rows wait for an operator.
_PURGE = f"""
WITH doomed AS (
    SELECT id FROM outbox
    WHERE state = '{S.COMPLETED}' AND completed_at < now() - $1::interval
    ORDER BY completed_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM outbox AS o USING doomed WHERE o.id = doomed.id RETURNING o.id
), runs AS (
    DELETE FROM task_runs AS r USING gone WHERE r.task_id = gone.id::text RETURNING r.task_id
)
SELECT (SELECT count(*) FROM gone) AS rows, (SELECT count(*) FROM runs) AS runs
"""


async def purge_completed(connection: Connection, older_than: timedelta, limit: int) -> tuple[int, int]:
    """Delete at most `limit` rows completed more than `older_than` ago, and their task runs.

    Returns (outbox rows, task runs) deleted. The caller chooses `older_than` longer than the
    longest redelivery window: a duplicate that arrives after its record is gone runs again.
    """
    row = await connection.fetchrow(_PURGE, older_than, limit)
    assert row is not None
    return int(row["rows"]), int(row["runs"])


# --- Measurement (the bench and the tests read the pipeline's timings) --------------------------


@dataclass(frozen=True, slots=True)
class Timing:
    id: UUID
    transaction_id: UUID | None
    task_name: str
    state: str
    created_at: datetime
    published_at: datetime | None
    started_at: datetime | None  # when a worker began its delivery (the latest, if several)
    completed_at: datetime | None


_TIMINGS = """
SELECT o.id, o.transaction_id, o.task_name, o.state, o.created_at, o.published_at,
       COALESCE(o.delivery_started_at, r.started_at) AS started_at, o.completed_at
FROM outbox o LEFT JOIN task_runs r ON r.task_id = o.id::text
WHERE o.id = ANY($1::uuid[])
"""


async def timings(connection: Connection, ids: Sequence[UUID]) -> list[Timing]:
    """When each of these rows was committed, published, started and completed."""
    return [Timing(**dict(r)) for r in await connection.fetch(_TIMINGS, list(ids))]


_TIMINGS_OF_TRANSACTIONS = """
SELECT o.id, o.transaction_id, o.task_name, o.state, o.created_at, o.published_at, r.started_at, o.completed_at
FROM outbox o LEFT JOIN task_runs r ON r.task_id = o.id::text
WHERE o.transaction_id = ANY($1::uuid[])
"""


async def timings_of_transactions(connection: Connection, transaction_ids: Sequence[UUID]) -> list[Timing]:
    """The same, for every row these transactions wrote."""
    return [Timing(**dict(r)) for r in await connection.fetch(_TIMINGS_OF_TRANSACTIONS, list(transaction_ids))]


_PUBLISH_WINDOW = """
SELECT count(*) AS n, extract(epoch FROM max(published_at) - min(published_at)) AS span
FROM outbox WHERE published_at IS NOT NULL
"""


async def publish_window(connection: Connection) -> tuple[int, float]:
    """How many rows were ever published, and the seconds between the first and the last."""
    row = await connection.fetchrow(_PUBLISH_WINDOW)
    assert row is not None
    return int(row["n"]), float(row["span"] or 0.0)


_RUN_COUNT = "SELECT count(*) FROM task_runs"


async def run_count(connection: Connection) -> int:
    """How many task ids a worker has started."""
    return int(await connection.fetchval(_RUN_COUNT))


_FILL = """
INSERT INTO outbox (id, task_name, kwargs, next_attempt_at)
SELECT gen_random_uuid(), $1, $2::jsonb, now() + make_interval(secs => $4) FROM generate_series(1, $3)
"""


async def fill(connection: Connection, task_name: str, kwargs_json: str, rows: int, due_in: float = 0.0) -> None:
    """Write `rows` identical pending rows (the bench's backlogs), due `due_in` seconds from now
    (a positive value stands for rows waiting in backoff)."""
    await connection.execute(_FILL, task_name, kwargs_json, rows, float(due_in))


async def analyze(connection: Connection) -> None:
    """Refresh the planner's statistics after a bulk write."""
    await connection.execute("ANALYZE outbox")


_CLEAR = "TRUNCATE outbox, task_runs, audit_log"


async def clear(connection: Connection) -> None:
    """Empty the outbox, the task runs and the audit log (the bench, between scenarios)."""
    await connection.execute(_CLEAR)
