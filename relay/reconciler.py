"""The reconciler: re-publish what was published, never completed, and whose message is gone.

A broker can lose a message after accepting it (a Redis restart without persistence, a flush,
kombu issue 305), and a worker can die in the middle of a delivery. Lateness alone proves
neither: a message may wait in a long queue for hours. So a published row is re-published only
on evidence that its message is gone (core.outbox.queries.reconcile_published has the rules):

- its delivery started and that delivery's lease ran out (the worker died, or froze); or
- it never started, no worker holds it unacknowledged, and the broker's queue is empty; or
- it never started, no worker holds it, and workers have finished messages published more than
  ORDER_MARGIN seconds after it (the queue, first in first out, moved past it).

RELAY_COMPLETION_DEADLINE is the age before which a published row is not even looked at: it
bounds how soon a lost message is noticed, and keeps the rules clear of the few milliseconds in
which a message taken off the queue has not recorded its start yet. A row whose task recorded its
effect in task_runs, but whose completion update was lost, is completed instead. After
RELAY_MAX_REPUBLISHES re-publishes a row is marked dead with the reason. Rows in failed or
completed are never touched. Safe on every relay at once (SKIP LOCKED).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg

from core.outbox import queries
from core.outbox.queries import Evidence
from core.outbox.states import OutboxState
from core.settings import Settings
from relay.broker import QueueInspector

log = logging.getLogger("relay.reconciler")

# Rows per statement: bounds the locks and the statement's time on a large overdue backlog.
CHUNK = 1000
# How much later than a row another message must have been published for "the queue moved past
# it" to hold, on top of RELAY_PUBLISH_TIMEOUT (which bounds how far published_at, stamped after
# the broker answered, can lag behind the message's real place in the queue). It also covers a
# worker that took the row's message just before a later one but recorded its start after it.
ORDER_SLACK = 10.0
# The latest completions whose publish times tell how far the queue has moved.
RECENT_COMPLETIONS = 100


@dataclass(frozen=True, slots=True)
class ReconcileResult:
    republished: int
    dead: int
    completed: int = 0


def order_margin(settings: Settings) -> float:
    """Seconds by which a later message must have been published to show the queue moved past a row."""
    return settings.relay_publish_timeout + ORDER_SLACK


async def reconcile(connection: asyncpg.Connection, inspector: QueueInspector, settings: Settings) -> ReconcileResult:
    """Re-publish (or give up on, or complete) overdue published rows, in chunks of CHUNK rows.

    The queue is observed once per chunk, before the chunk's statement reads the rows. Each
    chunk is its own short transaction. Logs one line per affected row and one summary line when
    anything changed.
    """
    republished = dead = completed = 0
    while True:
        observed = await inspector.observe()
        rows = await queries.reconcile_published(
            connection,
            deadline=settings.relay_completion_deadline,
            limit=CHUNK,
            max_republishes=settings.relay_max_republishes,
            queue=observed,
            order_margin=order_margin(settings),
            recent_completions=RECENT_COMPLETIONS,
        )
        for row in rows:
            if row.evidence == Evidence.EFFECT_RECORDED:
                completed += 1
                action = "its effect was recorded; marked completed"
            elif row.state == OutboxState.DEAD:
                dead += 1
                action = "message gone; re-publishes used up, marked dead"
            else:
                republished += 1
                action = "message gone; re-publishing"
            log.warning(
                f"{row.evidence}: {action}",
                extra={
                    "event": "relay.reconciled",
                    "outbox_id": str(row.id),
                    "task_name": row.task_name,
                    "state": row.state,
                    "republishes": row.republishes,
                    "evidence": str(row.evidence),
                },
            )
        if len(rows) < CHUNK:
            break
    if republished or dead or completed:
        log.info(
            "reconciled",
            extra={"event": "relay.reconcile", "republished": republished, "dead": dead, "completed": completed},
        )
    return ReconcileResult(republished, dead, completed)
