"""Operator commands: status, dead, replay, purge. Each returns the process exit code."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, TextIO
from uuid import UUID

import asyncpg

from core.outbox import queries
from core.outbox.states import ALL_OUTBOX_STATES, OutboxState
from core.settings import Settings

log = logging.getLogger("relay.operator")

PURGE_CHUNK = 5000
REPLAYED_REASON = "replayed by operator"


async def status(connection: asyncpg.Connection, out: TextIO, as_json: bool = False) -> int:
    """Print counts per state, the oldest pending and published ages, last-minute throughput
    and commit->completed latency (p50/p99, completed_at - created_at) over the last minute."""
    counts = await queries.state_counts(connection)
    figures = await queries.figures(connection)
    latency = await queries.completion_latency(connection)
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
    for state in ALL_OUTBOX_STATES:
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
    rows = await queries.given_up(connection, limit)
    if not rows:
        print("no dead or failed rows", file=out)
        return 0
    print("id\tstate\ttask_name\tattempts\trepublishes\tlast_error", file=out)
    for r in rows:
        error = (r.last_error or "").replace("\n", " ")
        print(f"{r.id}\t{r.state}\t{r.task_name}\t{r.attempts}\t{r.republishes}\t{error}", file=out)
    return 0


async def replay(
    connection: asyncpg.Connection,
    out: TextIO,
    err: TextIO,
    ids: Sequence[UUID],
    states: Sequence[OutboxState],
    *,
    force: bool = False,
) -> int:
    """Put the given dead/failed rows (or every row in `states`) back to pending with fresh counters.

    An email whose send may already have happened (a delivery took its lease to send and never
    finished nor proved that nothing went out) is replayed only with `force`: otherwise it is
    named on `err` and left alone. Returns 1 if some given id was not a dead or failed row, or
    was left alone for that reason (the others are still replayed).
    """
    async with connection.transaction():
        doubtful = [] if force else await queries.in_doubt(connection, ids=ids, states=states)
        replayed = await queries.replay(
            connection, ids=ids, states=states, reason=REPLAYED_REASON, spare_in_doubt=not force
        )
        if replayed:
            await queries.notify(connection)
    print(f"replayed {len(replayed)} row(s)", file=out)
    spared = {row.id for row in doubtful if row.id not in replayed}
    for row in doubtful:
        if row.id in spared:
            print(
                f"error: {row.id}: its email may already have been sent (a send started at "
                f"{row.last_send_started_at.isoformat(timespec='seconds')} and its outcome is unknown); "
                "check the mail server's log, then replay it with --force to send it again",
                file=err,
            )
    missing = [i for i in ids if i not in replayed and i not in spared]
    for row_id in missing:
        print(f"error: {row_id} is not a dead or failed outbox row", file=err)
    return 1 if missing or spared else 0


def minimum_retention(settings: Settings) -> timedelta:
    """The shortest age `purge` accepts: longer than the longest redelivery window.

    A task id's record in task_runs is what makes a late duplicate harmless, and it goes with its
    outbox row. A copy of a completed task's message can still arrive after kombu restores an
    unacknowledged copy (CELERY_VISIBILITY_TIMEOUT), after a retry's countdown
    (CELERY_RETRY_BACKOFF_MAX), or behind a re-publish (RELAY_COMPLETION_DEADLINE before it).
    """
    return timedelta(
        seconds=settings.celery_visibility_timeout
        + settings.celery_retry_backoff_max
        + settings.relay_completion_deadline
    )


async def purge(connection: asyncpg.Connection, out: TextIO, older_than: timedelta) -> int:
    """Delete completed rows older than `older_than`, and their task_runs records, PURGE_CHUNK rows
    per statement. The caller checks `older_than` against minimum_retention()."""
    rows = runs = 0
    while True:
        deleted, deleted_runs = await queries.purge_completed(connection, older_than, PURGE_CHUNK)
        rows += deleted
        runs += deleted_runs
        if deleted < PURGE_CHUNK:
            break
    print(f"purged {rows} row(s) and {runs} task run(s) older than {older_than}", file=out)
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
