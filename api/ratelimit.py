"""The per-client request budget: RATE_LIMIT in the `limits` library's notation ("100/second").

Counted with the sliding-window-counter strategy: without a fixed window's double burst at
the window's edge, and two counters per client instead of a moving window's one entry per
request.

The counters live in Redis (RATE_LIMIT_STORAGE_URL, by default the broker's Redis), so every
API process shares one budget per client. When that Redis does not answer, each process
counts in its own memory instead (logged once, when it happens) and tries Redis again a few
seconds later: a Redis outage loosens the limit to one budget per process, it does not stop
the API. Each client has its own counters, so one client's burst never uses another's budget.

A process does not ask Redis for every request: it reserves a client's slots in chunks (one
script call counts the whole chunk) and spends them locally, so Redis is asked about once per
tenth of the window (RESERVATION_SHARE) per busy client instead of once per request (that call
was a tenth of a transfer's CPU). A chunk is what this process served that client in the previous
such period, at most a tenth of the budget, so a client at a steady pace uses its slots before
they lapse; a client seen for the first time, or a budget of under 10, is counted one request at
a time, as is every request once a chunk no longer fits the budget. The price, per process and
client: slots reserved but not used before they lapse (at most one chunk) are refused to the
client, and a chunk reserved just before Redis starts the client's next window counts in the
window it was reserved in (at most one chunk, once per window, allowed beyond the budget).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
# A reservation lapses after this share of the limit's window; its chunk is at most this share
# of the budget.
RESERVATION_SHARE = 10
# Clients with reservations kept per process; past it they are dropped (their slots unused).
_RESERVATIONS_LIMIT = 10_000


@dataclass
class _Reservation:
    """One client's slots in this process: reserved in the shared counters, not used yet."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    slots: int = 0
    lapses_at: float = 0.0  # on the limiter's clock
    period: int = 0  # which RESERVATION_SHARE of the window `served` counts in
    served: int = 0  # requests admitted in `period`
    previously_served: int = 0  # requests admitted in the period before `period`
    singly_until: float = 0.0  # a chunk did not fit: one request at a time until then

    def move_to(self, period: int) -> None:
        """Start counting `period` (a later one), if not yet."""
        if period != self.period:
            self.previously_served = self.served if period == self.period + 1 else 0
            self.period, self.served = period, 0


class RateLimited(Exception):
    """The caller used up its budget; `retry_after` is whole seconds until a request fits again."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"rate limit exceeded; retry after {retry_after}s")
        self.retry_after = retry_after


class RateLimiter:
    def __init__(self, limit: str, storage_uri: str, clock: Callable[[], float] = time.monotonic) -> None:
        """`clock` (seconds) times the reservations; tests pass their own."""
        self._clock = clock
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
        self._period = self._item.get_expiry() / RESERVATION_SHARE  # seconds
        self._largest_chunk = max(1, self._item.amount // RESERVATION_SHARE)
        self._reservations: dict[str, _Reservation] = {}

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
        now = self._clock()
        reservation = self._reservations.get(caller)
        if reservation is None:
            reservation = self._reservation(caller)
        reservation.move_to(int(now // self._period))
        if not (reservation.slots and now < reservation.lapses_at):
            async with reservation.lock:  # one reservation at a time per client: no chunks reserved twice
                now = self._clock()
                if not (reservation.slots and now < reservation.lapses_at):
                    await self._reserve(reservation, caller, now)
        reservation.slots -= 1
        reservation.served += 1

    async def _reserve(self, reservation: _Reservation, caller: str, now: float) -> None:
        """Reserve a chunk of `caller`'s slots (at least one), or raise RateLimited."""
        chunk = 1 if now < reservation.singly_until else min(self._largest_chunk, max(1, reservation.previously_served))
        limiter = self._limiter()
        try:
            allowed = await limiter.hit(self._item, caller, cost=chunk)
            if not allowed and chunk > 1:  # near the limit: one request at a time, as exact as Redis
                chunk, reservation.singly_until = 1, now + self._period
                allowed = await limiter.hit(self._item, caller)
        except StorageError as exc:
            self._fall_back(f"{type(exc.storage_error).__name__}: {exc.storage_error}")
            limiter, chunk = self._local, 1
            allowed = await limiter.hit(self._item, caller)
        if not allowed:
            raise RateLimited(await self._retry_after(limiter, caller))
        reservation.slots, reservation.lapses_at = chunk, now + self._period

    def _reservation(self, caller: str) -> _Reservation:
        if len(self._reservations) >= _RESERVATIONS_LIMIT:
            # A crude bound: the unused slots of the dropped clients are lost (refused, never extra).
            self._reservations = {key: kept for key, kept in self._reservations.items() if kept.lock.locked()}
        reservation = self._reservations[caller] = _Reservation()
        return reservation

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
