"""Operator commands: status, dead, replay, purge. Each returns the process exit code."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, TextIO
from uuid import UUID

import asyncpg

from core.contract import OUTBOX_CHANNEL, OutboxState

log = logging.getLogger("relay.operator")

PURGE_CHUNK = 5000
REPLAYED_REASON = "replayed by operator"

_COUNTS = "SELECT state, count(*) AS n FROM outbox GROUP BY state"
_FIGURES = f"""
SELECT
  (SELECT extract(epoch FROM now() - min(created_at)) FROM outbox WHERE state = '{OutboxState.PENDING}')
      AS oldest_pending_s,
  (SELECT extract(epoch FROM now() - min(published_at)) FROM outbox WHERE state = '{OutboxState.PUBLISHED}')
      AS oldest_published_s,
  (SELECT count(*) FROM outbox WHERE published_at > now() - interval '1 minute') AS published_last_minute,
  (SELECT count(*) FROM outbox WHERE completed_at > now() - interval '1 minute') AS completed_last_minute
"""
_LATENCY = """
SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY extract(epoch FROM completed_at - created_at))
FROM outbox WHERE completed_at > now() - interval '1 minute'
"""
_DEAD = f"""
SELECT id, state, task_name, attempts, republishes, last_error, created_at
FROM outbox WHERE state IN ('{OutboxState.DEAD}', '{OutboxState.FAILED}')
ORDER BY created_at LIMIT $1
"""
_REPLAY = f"""
UPDATE outbox
SET state = '{OutboxState.PENDING}', attempts = 0, republishes = 0, next_attempt_at = now(),
    published_at = NULL, completed_at = NULL, last_error = $2
WHERE id = ANY($1::uuid[]) AND state IN ('{OutboxState.DEAD}', '{OutboxState.FAILED}')
RETURNING id
"""
_REPLAY_ALL = f"""
UPDATE outbox
SET state = '{OutboxState.PENDING}', attempts = 0, republishes = 0, next_attempt_at = now(),
    published_at = NULL, completed_at = NULL, last_error = $2
WHERE state = ANY($1::text[])
RETURNING id
"""
# Short statements, each deleting at most PURGE_CHUNK rows and skipping rows someone holds.
# Only completed rows: a published row is still tracked by the reconciler until its task
# completes, and dead or failed rows wait for an operator.
_PURGE = f"""
DELETE FROM outbox WHERE id IN (
    SELECT id FROM outbox
    WHERE state = '{OutboxState.COMPLETED}' AND completed_at < now() - $1::interval
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
"""


async def status(connection: asyncpg.Connection, out: TextIO, as_json: bool = False) -> int:
    """Print counts per state, the oldest pending and published ages, last-minute throughput
    and commit->completed latency (p50/p99, completed_at - created_at) over the last minute."""
    counts = dict.fromkeys(OutboxState.ALL, 0)
    counts.update({r["state"]: r["n"] for r in await connection.fetch(_COUNTS)})
    figures = await connection.fetchrow(_FIGURES)
    assert figures is not None  # an aggregate query always returns its one row
    latency = await connection.fetchval(_LATENCY)
    report: dict[str, Any] = {
        "counts": counts,
        "oldest_pending_age_s": _seconds(figures["oldest_pending_s"]),
        "oldest_published_not_completed_age_s": _seconds(figures["oldest_published_s"]),
        "published_last_minute": figures["published_last_minute"],
        "completed_last_minute": figures["completed_last_minute"],
        "commit_to_completed_p50_s": _seconds(latency[0]) if latency else None,
        "commit_to_completed_p99_s": _seconds(latency[1]) if latency else None,
    }
    if as_json:
        print(json.dumps(report), file=out)
        return 0
    for state in OutboxState.ALL:
        print(f"{state + ':':<12}{counts[state]}", file=out)
    lines = [
        ("oldest pending", _age(report["oldest_pending_age_s"])),
        ("oldest published, not completed", _age(report["oldest_published_not_completed_age_s"])),
        ("published in the last minute", str(report["published_last_minute"])),
        ("completed in the last minute", str(report["completed_last_minute"])),
        (
            "commit->completed (last minute)",
            "n/a"
            if latency is None
            else f"p50 {_age(report['commit_to_completed_p50_s'])}, p99 {_age(report['commit_to_completed_p99_s'])}",
        ),
    ]
    for label, value in lines:
        print(f"{label + ':':<34}{value}", file=out)
    return 0


async def dead(connection: asyncpg.Connection, out: TextIO, limit: int) -> int:
    """List dead (publishing gave up) and failed (the task gave up) rows, oldest first."""
    rows = await connection.fetch(_DEAD, limit)
    if not rows:
        print("no dead or failed rows", file=out)
        return 0
    print("id\tstate\ttask_name\tattempts\trepublishes\tlast_error", file=out)
    for r in rows:
        error = (r["last_error"] or "").replace("\n", " ")
        print(f"{r['id']}\t{r['state']}\t{r['task_name']}\t{r['attempts']}\t{r['republishes']}\t{error}", file=out)
    return 0


async def replay(
    connection: asyncpg.Connection, out: TextIO, err: TextIO, ids: Sequence[UUID], states: Sequence[str]
) -> int:
    """Put the given dead/failed rows (or every row in `states`) back to pending with fresh counters.

    Returns 1 if some given id was not a dead or failed row (the others are still replayed).
    """
    async with connection.transaction():
        if ids:
            records = await connection.fetch(_REPLAY, list(ids), REPLAYED_REASON)
        else:
            records = await connection.fetch(_REPLAY_ALL, list(states), REPLAYED_REASON)
        if records:
            await connection.execute("SELECT pg_notify($1, '')", OUTBOX_CHANNEL)
    replayed = {r["id"] for r in records}
    print(f"replayed {len(replayed)} row(s)", file=out)
    missing = [i for i in ids if i not in replayed]
    for row_id in missing:
        print(f"error: {row_id} is not a dead or failed outbox row", file=err)
    return 1 if missing else 0


async def purge(connection: asyncpg.Connection, out: TextIO, older_than: timedelta) -> int:
    """Delete completed and published rows older than `older_than`, PURGE_CHUNK rows per statement."""
    total = 0
    while True:
        result = await connection.execute(_PURGE, older_than, PURGE_CHUNK)
        deleted = int(result.split()[-1])
        total += deleted
        if deleted < PURGE_CHUNK:
            break
    print(f"purged {total} row(s) older than {older_than}", file=out)
    return 0


def _seconds(value: Any) -> float | None:
    return None if value is None else round(float(value), 3)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "none"
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return str(timedelta(seconds=round(seconds)))
