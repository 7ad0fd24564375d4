"""The SQL of one relay batch: claim pending rows, then mark each published or failed.

All of it runs in the one transaction that holds the claimed rows' locks, so a row is marked
published only if the broker accepted it, and a crash before commit releases the rows as they
were (at most a re-publish with the same task id, never a loss).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg

from core.contract import OutboxState

_CLAIM = f"""
SELECT id, task_name, kwargs, attempts
FROM outbox
WHERE state = '{OutboxState.PENDING}' AND next_attempt_at <= now()
ORDER BY created_at
LIMIT $1
FOR UPDATE SKIP LOCKED
"""

_MARK_PUBLISHED = f"""
UPDATE outbox
SET state = '{OutboxState.PUBLISHED}', published_at = clock_timestamp(), attempts = attempts + 1
WHERE id = ANY($1::uuid[])
"""

_RECORD_FAILURES = f"""
UPDATE outbox AS o
SET attempts = o.attempts + 1,
    last_error = f.error,
    next_attempt_at = now() + make_interval(secs => f.delay),
    state = CASE WHEN o.attempts + 1 >= $4 THEN '{OutboxState.DEAD}' ELSE '{OutboxState.PENDING}' END
FROM unnest($1::uuid[], $2::text[], $3::float8[]) AS f(id, error, delay)
WHERE o.id = f.id
RETURNING o.id, o.state, o.attempts
"""


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A claimed row: what the publisher needs, and how many attempts it already had."""

    id: UUID
    task_name: str
    kwargs: Any  # JSON from the database; a publisher rejects anything but an object
    attempts: int


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed publish attempt of one row, and how long to wait before the next."""

    row: OutboxRow
    error: str
    delay: float


async def claim_pending(connection: asyncpg.Connection, limit: int) -> list[OutboxRow]:
    """Lock up to `limit` due pending rows, oldest first, skipping rows other relays hold.

    Must run inside a transaction; the locks last until it ends.
    """
    records = await connection.fetch(_CLAIM, limit)
    return [OutboxRow(r["id"], r["task_name"], r["kwargs"], r["attempts"]) for r in records]


async def mark_published(connection: asyncpg.Connection, ids: Sequence[UUID]) -> None:
    """Record that the broker accepted these rows (state published, published_at, attempts + 1)."""
    if ids:
        await connection.execute(_MARK_PUBLISHED, list(ids))


async def record_failures(
    connection: asyncpg.Connection, failures: Sequence[Failure], max_attempts: int
) -> dict[UUID, tuple[str, int]]:
    """Count a failed attempt per row, keep its error, schedule its retry; dead at max_attempts.

    Returns each row's new (state, attempts).
    """
    if not failures:
        return {}
    records = await connection.fetch(
        _RECORD_FAILURES,
        [f.row.id for f in failures],
        [f.error for f in failures],
        [f.delay for f in failures],
        max_attempts,
    )
    return {r["id"]: (r["state"], r["attempts"]) for r in records}
