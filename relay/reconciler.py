"""The reconciler: re-publish what was published but never completed.

A broker can lose a message after accepting it (a Redis restart without persistence, a
flush, kombu issue 305). Rows published more than RELAY_COMPLETION_DEADLINE ago and still
not completed go back to pending and are published again with the same task id; the worker's
idempotency by task id makes that safe. After RELAY_MAX_REPUBLISHES re-publishes a row is
marked dead with the reason. Rows in failed or completed are never touched. Safe on every
relay at once: rows are taken with FOR UPDATE SKIP LOCKED.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg

from core.contract import OutboxState
from core.settings import Settings

log = logging.getLogger("relay.reconciler")

REPUBLISHED_REASON = "not completed within deadline; re-published"
DEAD_REASON = "not completed within deadline after {} re-publishes"
# Rows per statement: bounds the locks and the statement's time on a large overdue backlog.
CHUNK = 1000

# attempts restarts at 0: it counts the publish attempts of the current round, so a short broker
# outage right after a re-publish does not use up the budget earlier rounds spent.
_RECONCILE = f"""
WITH overdue AS (
    SELECT id FROM outbox
    WHERE state = '{OutboxState.PUBLISHED}' AND published_at < now() - make_interval(secs => $1)
    ORDER BY published_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE outbox AS o
SET state = CASE WHEN o.republishes >= $3 THEN '{OutboxState.DEAD}' ELSE '{OutboxState.PENDING}' END,
    republishes = CASE WHEN o.republishes >= $3 THEN o.republishes ELSE o.republishes + 1 END,
    attempts = CASE WHEN o.republishes >= $3 THEN o.attempts ELSE 0 END,
    next_attempt_at = now(),
    last_error = CASE WHEN o.republishes >= $3 THEN $4 ELSE $5 END
FROM overdue
WHERE o.id = overdue.id
RETURNING o.id, o.task_name, o.state, o.republishes
"""


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
        records = await connection.fetch(
            _RECONCILE,
            settings.relay_completion_deadline,
            CHUNK,
            settings.relay_max_republishes,
            DEAD_REASON.format(settings.relay_max_republishes),
            REPUBLISHED_REASON,
        )
        for record in records:
            is_dead = record["state"] == OutboxState.DEAD
            dead += is_dead
            republished += not is_dead
            log.warning(
                "not completed within deadline; " + ("marked dead" if is_dead else "re-publishing"),
                extra={
                    "event": "relay.reconciled",
                    "outbox_id": str(record["id"]),
                    "task_name": record["task_name"],
                    "state": record["state"],
                    "republishes": record["republishes"],
                },
            )
        if len(records) < CHUNK:
            break
    if republished or dead:
        log.info("reconciled", extra={"event": "relay.reconcile", "republished": republished, "dead": dead})
    return ReconcileResult(republished, dead)
