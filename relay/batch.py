"""One relay batch: claim, publish, mark, commit, all in the transaction that holds the locks."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import asyncpg

from core.backoff import backoff_delay
from core.outbox.queries import Failure, claim_pending, mark_published, record_failures
from core.outbox.states import OutboxState
from core.settings import Settings
from relay.publisher import Publisher

log = logging.getLogger("relay.batch")


@dataclass(frozen=True, slots=True)
class BatchResult:
    claimed: int
    published: int
    failed: int
    dead: int
    elapsed_ms: float


async def relay_batch(connection: asyncpg.Connection, publisher: Publisher, settings: Settings) -> BatchResult:
    """Publish up to RELAY_BATCH_SIZE due pending rows and record each outcome.

    A row is marked published only after the broker accepted it, in the transaction that
    claimed it; failures count an attempt, keep the error and schedule a retry with backoff
    and jitter, or mark the row dead after RELAY_MAX_ATTEMPTS. If anything raises before the
    commit, the transaction rolls back and the rows are simply pending again.
    Logs one line per non-empty batch and one per failed row.
    """
    started = time.perf_counter()
    async with connection.transaction():
        rows = await claim_pending(connection, settings.relay_batch_size)
        if not rows:
            return BatchResult(0, 0, 0, 0, 0.0)
        outcomes = await publisher.publish(rows)
        published = [row.id for row, error in zip(rows, outcomes, strict=True) if error is None]
        base, cap = settings.relay_backoff_base, settings.relay_backoff_max
        failures = [
            Failure(row, error, backoff_delay(row.attempts + 1, base=base, cap=cap))
            for row, error in zip(rows, outcomes, strict=True)
            if error is not None
        ]
        await mark_published(connection, published)
        states = await record_failures(connection, failures, settings.relay_max_attempts)
    dead = 0
    for failure in failures:
        state, attempts = states.get(failure.row.id, (OutboxState.PENDING, failure.row.attempts + 1))
        dead += state == OutboxState.DEAD
        log.warning(
            "publish failed; row is dead" if state == OutboxState.DEAD else "publish failed; will retry",
            extra={
                "event": "relay.publish_failed",
                "outbox_id": str(failure.row.id),
                "task_name": failure.row.task_name,
                "error": failure.error,
                "attempts": attempts,
                "state": state,
                "retry_in_s": None if state == OutboxState.DEAD else round(failure.delay, 3),
            },
        )
    result = BatchResult(
        len(rows), len(published), len(failures), dead, round((time.perf_counter() - started) * 1000, 2)
    )
    log.info(
        "batch",
        extra={
            "event": "relay.batch",
            "claimed": result.claimed,
            "published": result.published,
            "failed": result.failed,
            "dead": result.dead,
            "elapsed_ms": result.elapsed_ms,
        },
    )
    return result
