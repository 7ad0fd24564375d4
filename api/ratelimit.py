"""The per-client request budget: RATE_LIMIT in the `limits` library's notation ("100/second").

Counted with the sliding-window-counter strategy: one Redis round trip per request like a
fixed window, but without a fixed window's double burst at the window's edge, and two
counters per client instead of a moving window's one entry per request.

The counters live in Redis (RATE_LIMIT_STORAGE_URL, by default the broker's Redis), so every
API process shares one budget per client. When that Redis does not answer, each process
counts in its own memory instead (logged once, when it happens) and tries Redis again a few
seconds later: a Redis outage loosens the limit to one budget per process, it does not stop
the API. Each client has its own counters, so one client's burst never uses another's budget.
"""

from __future__ import annotations

import logging
import math
import time
from typing import cast

from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError
from limits.storage import storage_from_string

logger = logging.getLogger(__name__)

# A limiter call must not slow a request down when Redis hangs: bound it, then count in memory.
REDIS_TIMEOUT = 0.25
RETRY_SHARED_AFTER = 5.0


class RateLimited(Exception):
    """The caller used up its budget; `retry_after` is whole seconds until a request fits again."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"rate limit exceeded; retry after {retry_after}s")
        self.retry_after = retry_after


class RateLimiter:
    def __init__(self, limit: str, storage_uri: str) -> None:
        self._item: RateLimitItem = parse(limit)
        self._local = SlidingWindowCounterRateLimiter(MemoryStorage())
        self._shared: SlidingWindowCounterRateLimiter | None = None
        if not storage_uri.startswith("memory://"):
            storage = storage_from_string(
                f"async+{storage_uri}",
                implementation="redispy",
                wrap_exceptions=True,
                socket_timeout=REDIS_TIMEOUT,
                socket_connect_timeout=REDIS_TIMEOUT,
            )
            self._shared = SlidingWindowCounterRateLimiter(cast(Storage, storage))
        self._local_until = 0.0  # while in the future, count in memory (Redis did not answer)

    @property
    def limit(self) -> str:
        return str(self._item)

    async def check_shared(self) -> bool:
        """Whether the shared counters answer (logged either way, once, at start-up)."""
        if self._shared is None:
            logger.info("rate limit %s: counted in this process's memory (RATE_LIMIT_STORAGE_URL)", self.limit)
            return False
        if await self._shared.storage.check():
            logger.info("rate limit %s: counted in Redis, shared by every API process", self.limit)
            return True
        self._fall_back("Redis did not answer at start-up")
        return False

    async def hit(self, caller: str) -> None:
        """Count one request of `caller`. Raises RateLimited when its budget is used up."""
        limiter = self._limiter()
        try:
            allowed = await limiter.hit(self._item, caller)
        except StorageError as exc:
            self._fall_back(f"{type(exc.storage_error).__name__}: {exc.storage_error}")
            limiter = self._local
            allowed = await limiter.hit(self._item, caller)
        if not allowed:
            raise RateLimited(await self._retry_after(limiter, caller))

    def _limiter(self) -> SlidingWindowCounterRateLimiter:
        if self._shared is None:
            return self._local
        if self._local_until:
            if time.monotonic() < self._local_until:
                return self._local
            self._local_until = 0.0
            logger.info("rate limit: trying Redis again for the shared counters")
        return self._shared

    def _fall_back(self, reason: str) -> None:
        if not self._local_until:
            logger.warning(
                "rate limit: the shared counters are unavailable (%s); counting in this process's memory, "
                "so each API process allows %s per client until Redis answers",
                reason,
                self.limit,
            )
        self._local_until = time.monotonic() + RETRY_SHARED_AFTER

    async def _retry_after(self, limiter: SlidingWindowCounterRateLimiter, caller: str) -> int:
        try:
            stats = await limiter.get_window_stats(self._item, caller)
        except StorageError:
            return max(1, math.ceil(self._item.get_expiry() / max(self._item.amount, 1)))
        return max(1, math.ceil(stats.reset_time - time.time()))
