"""The reconciler: re-publish what was published but never completed.

A broker can lose a message after accepting it (a Redis restart without persistence, a
flush, kombu issue 305). Rows published more than RELAY_COMPLETION_DEADLINE ago and still
not completed go back to pending and are published again with the same task id; the worker's
idempotency by task id makes that safe. After RELAY_MAX_REPUBLISHES re-publishes a row is
marked dead with the reason. Rows in failed or completed are never touched. Safe on every
relay at once (core.outbox.queries.reset_overdue skips locked rows).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg

from core.outbox import queries
from core.outbox.states import OutboxState
from core.settings import Settings

log = logging.getLogger("relay.reconciler")

REPUBLISHED_REASON = "not completed within deadline; re-published"
DEAD_REASON = "not completed within deadline after {} re-publishes"
# Rows per statement: bounds the locks and the statement's time on a large overdue backlog.
CHUNK = 1000


@dataclass(frozen=True, slots=True)
class ReconcileResult:
    republished: int
    dead: int


async def reconcile(connection: asyncpg.Connection, settings: Settings) -> ReconcileResult:
    """Send overdue published rows back to pending (or to dead), in chunks of CHUNK rows.

    Each chunk is its own short transaction. Logs one line per affected row and one summary
    line when anything was overdue.
    """
    republished = dead = 0
    while True:
        rows = await queries.reset_overdue(
            connection,
            deadline=settings.relay_completion_deadline,
            limit=CHUNK,
            max_republishes=settings.relay_max_republishes,
            dead_reason=DEAD_REASON.format(settings.relay_max_republishes),
            republished_reason=REPUBLISHED_REASON,
        )
        for row in rows:
            is_dead = row.state == OutboxState.DEAD
            dead += is_dead
            republished += not is_dead
            log.warning(
                "not completed within deadline; " + ("marked dead" if is_dead else "re-publishing"),
                extra={
                    "event": "relay.reconciled",
                    "outbox_id": str(row.id),
                    "task_name": row.task_name,
                    "state": row.state,
                    "republishes": row.republishes,
                },
            )
        if len(rows) < CHUNK:
            break
    if republished or dead:
        log.info("reconciled", extra={"event": "relay.reconcile", "republished": republished, "dead": dead})
    return ReconcileResult(republished, dead)
