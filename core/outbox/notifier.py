"""Waking the relay at commit, at most once per interval per process."""

from __future__ import annotations

import time

from core.outbox.queries import Connection, notify


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

    async def maybe_notify(self, connection: Connection) -> bool:
        """NOTIFY inside the caller's transaction (delivered at commit) unless one went out recently."""
        now = time.monotonic()
        if now - self._last < self._interval:
            return False
        self._last = now
        await notify(connection)
        return True
