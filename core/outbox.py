"""Writing outbox rows inside the caller's transaction, and waking the relay at commit."""

from __future__ import annotations

import time
import uuid
from uuid import UUID

import asyncpg
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession

from core.contract import OUTBOX_CHANNEL, TaskMessage
from core.models import Outbox


async def add_outbox_rows(
    session: AsyncSession, transaction_id: UUID | None, messages: list[TaskMessage]
) -> list[UUID]:
    """Insert one pending outbox row per message in the session's transaction; return their ids.

    The ids become the Celery task ids.
    """
    ids = [uuid.uuid4() for _ in messages]
    rows = [
        {"id": row_id, "task_name": m.task_name, "kwargs": m.kwargs, "transaction_id": transaction_id}
        for row_id, m in zip(ids, messages, strict=True)
    ]
    # A prebuilt statement run as executemany: compiled once, pipelined by asyncpg.
    connection = await session.connection()
    await connection.execute(_ADD, rows)
    return ids


_ADD = insert(Outbox)
_NOTIFY = "SELECT pg_notify($1, '')"


class CommitNotifier:
    """Sends a coalesced NOTIFY on the outbox channel from inside a transaction.

    PostgreSQL serializes the commits of notifying transactions on a global lock, so a NOTIFY
    in every transfer halves throughput under concurrency. At most one transaction per
    `interval` seconds (per process) notifies; the relay keeps polling for a short while after
    each wake-up, so rows committed in between are picked up at once. A skipped or lost
    notification only delays a row until the relay's next poll; it never loses it.
    """

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._last = float("-inf")

    async def maybe_notify(self, connection: asyncpg.Connection) -> bool:
        """NOTIFY inside the caller's transaction (delivered at commit) unless one went out recently."""
        now = time.monotonic()
        if now - self._last < self._interval:
            return False
        self._last = now
        await connection.execute(_NOTIFY, OUTBOX_CHANNEL)
        return True
