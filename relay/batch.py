"""One relay batch: claim, publish, mark, commit, all in the transaction that holds the locks."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from uuid import UUID

import asyncpg

from core.backoff import backoff_delay
from core.contract import TASK_NAMES
from core.outbox.queries import Failure, OutboxRow, claim_pending, mark_dead, mark_published, record_failures
from core.outbox.states import OutboxState
from core.settings import Settings
from core.telemetry import trace_id_of
from relay.metrics import POISON, REFUSED, UNREACHABLE, RelayMetrics
from relay.publisher import Publisher, Refused, Unsent

log = logging.getLogger("relay.batch")

# Called inside the batch's transaction after the publish and the marking, just before the
# commit (the frozen-relay test's hook; see relay.daemon.hold_hook_from_environment).
BeforeCommit = Callable[["BatchResult"], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class BatchResult:
    claimed: int
    published: int
    failed: int
    dead: int
    elapsed_ms: float
    unreachable: str | None = None  # set when the broker could not be reached: nothing was counted
    poisoned: int = 0  # rows marked dead at once, without a publish


def poison_reason(row: OutboxRow) -> str | None:
    """Why no publish could ever turn this row into a task a worker runs, or None if one can."""
    if row.decode_error is not None:
        return f"poison row: {row.decode_error}"
    if not isinstance(row.kwargs, dict):
        return f"poison row: kwargs must be a JSON object, got {type(row.kwargs).__name__}"
    if row.task_name not in TASK_NAMES:
        return f"poison row: task {row.task_name!r} is not in the contract ({', '.join(TASK_NAMES)})"
    return None


async def relay_batch(
    connection: asyncpg.Connection,
    publisher: Publisher,
    settings: Settings,
    before_commit: BeforeCommit | None = None,
    metrics: RelayMetrics | None = None,
) -> BatchResult:
    """Publish up to RELAY_BATCH_SIZE due pending rows and record each outcome.

    A row is marked published only after the broker accepted it, in the transaction that
    claimed it. A poison row (see poison_reason) is marked dead at once, with the reason, and the
    rest of its batch goes out. A message the broker refused counts an attempt, keeps the error
    and is retried with backoff and jitter, or is marked dead after RELAY_MAX_ATTEMPTS. A row the
    broker could not be reached for is left untouched (no attempt counted) and the result says
    `unreachable`: the caller stops claiming until the broker answers again. If anything raises
    before the commit, the transaction rolls back and the rows are simply pending again.
    Logs one line per non-empty batch and one per failed or poisoned row (with the row's trace id).
    With `metrics`, counts the committed batch's outcomes there.
    """
    started = time.perf_counter()
    async with connection.transaction():
        rows = await claim_pending(connection, settings.relay_batch_size)
        if not rows:
            return BatchResult(0, 0, 0, 0, 0.0)
        poison = [(row, reason) for row in rows if (reason := poison_reason(row)) is not None]
        sendable = [row for row in rows if poison_reason(row) is None] if poison else rows
        outcomes = await publisher.publish(sendable) if sendable else []
        accepted_at = time.time()
        published_rows = [row for row, outcome in zip(sendable, outcomes, strict=True) if outcome is None]
        published = [row.id for row in published_rows]
        base, cap = settings.relay_backoff_base, settings.relay_backoff_max
        failures = [
            Failure(row, outcome.error, backoff_delay(row.attempts + 1, base=base, cap=cap))
            for row, outcome in zip(sendable, outcomes, strict=True)
            if isinstance(outcome, Refused)
        ]
        unsent = [outcome for outcome in outcomes if isinstance(outcome, Unsent)]
        unreachable = next((outcome.error for outcome in unsent if outcome.broker_down), None)
        await mark_dead(connection, [(row.id, reason) for row, reason in poison])
        await mark_published(connection, published)
        states = await record_failures(connection, failures, settings.relay_max_attempts)
        result = BatchResult(
            len(rows),
            len(published),
            len(failures),
            sum(state == OutboxState.DEAD for state, _ in states.values()),
            round((time.perf_counter() - started) * 1000, 2),
            unreachable,
            len(poison),
        )
        if before_commit is not None:
            await before_commit(result)
    if metrics is not None:
        metrics.batch(
            len(rows), time.perf_counter() - started, published_rows, accepted_at, result.dead + result.poisoned
        )
        metrics.publish_errors(REFUSED, len(failures))
        metrics.publish_errors(POISON, len(poison))
        metrics.publish_errors(UNREACHABLE, sum(outcome.broker_down for outcome in unsent))
    _log_rows(poison, failures, states)
    log.info(
        "batch",
        extra={
            "event": "relay.batch",
            "claimed": result.claimed,
            "published": result.published,
            "failed": result.failed,
            "dead": result.dead,
            "poisoned": result.poisoned,
            "unsent": len(unsent),
            "elapsed_ms": result.elapsed_ms,
        },
    )
    return result


def _trace(row: OutboxRow) -> dict[str, str]:
    """The row's trace id for its log line (these lines are logged outside any span)."""
    trace_id = trace_id_of(row.traceparent)
    return {"trace_id": trace_id} if trace_id else {}


def _log_rows(
    poison: list[tuple[OutboxRow, str]], failures: list[Failure], states: dict[UUID, tuple[str, int]]
) -> None:
    for row, reason in poison:
        log.warning(
            "poison row; marked dead",
            extra={
                "event": "relay.poison",
                "outbox_id": str(row.id),
                **_trace(row),
                "task_name": row.task_name,
                "error": reason,
                "state": OutboxState.DEAD,
            },
        )
    for failure in failures:
        state, attempts = states.get(failure.row.id, (OutboxState.PENDING, failure.row.attempts + 1))
        log.warning(
            "publish refused; row is dead" if state == OutboxState.DEAD else "publish refused; will retry",
            extra={
                "event": "relay.publish_failed",
                "outbox_id": str(failure.row.id),
                **_trace(failure.row),
                "task_name": failure.row.task_name,
                "error": failure.error,
                "attempts": attempts,
                "state": state,
                "retry_in_s": None if state == OutboxState.DEAD else round(failure.delay, 3),
            },
        )
