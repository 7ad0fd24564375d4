"""The relay's main loop: wake on NOTIFY or poll, relay batches, reconcile, survive outages.

Wake-up policy: the API sends a coalesced NOTIFY at commit; the relay LISTENs on its own
connection. After a non-empty batch it keeps polling every RELAY_BUSY_POLL for RELAY_LINGER,
so rows committed just after a coalesced (skipped) notification still go out at once; when
idle it polls every RELAY_POLL_INTERVAL as a fallback. A lost notification or a dropped LISTEN
connection therefore only delays a row, never loses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time

import asyncpg

from core.contract import OUTBOX_CHANNEL
from core.logging import describe
from core.settings import Settings
from core.transient import CONNECTION_ERRORS
from relay.batch import relay_batch
from relay.db import connect
from relay.publisher import Publisher, create_publisher
from relay.reconciler import reconcile

log = logging.getLogger("relay.daemon")

# Concurrent batches per relay process: two overlap Python work with database round trips.
LANES = 2
RECONNECT_INITIAL = 0.5
RECONNECT_MAX = 10.0


class ConnectionLost(Exception):
    """A relay connection closed under us; reconnect."""


# Expected while the database is away: logged without a traceback.
_EXPECTED = (*CONNECTION_ERRORS, ConnectionLost)


class Relay:
    """Runs until stop() is called; then finishes the batches in hand, commits and returns.

    Work is done by LANES coroutines, each with its own connection and transaction. Lane 0
    follows the notifications and polls; the others join in only while there is a backlog
    (a lane claimed a full batch), so one lane's publishing overlaps another's database
    round trips without doubling the idle polling.
    """

    def __init__(self, settings: Settings, publisher: Publisher | None = None, lanes: int = LANES) -> None:
        self._settings = settings
        self._publisher = publisher or create_publisher(settings)
        self._wakeups = [asyncio.Event() for _ in range(lanes)]
        self._stopping = False
        self._reconnect_delay = RECONNECT_INITIAL

    def stop(self) -> None:
        """Ask the relay to exit after the batches in hand. Safe to call from a signal handler."""
        if not self._stopping:
            log.info("stopping after the current batch", extra={"event": "relay.stopping"})
        self._stopping = True
        for wakeup in self._wakeups:
            wakeup.set()

    async def run(self) -> None:
        """Relay until stop(). Reconnects with backoff whenever the database goes away."""
        log.info("relay started", extra={"event": "relay.start", "batch_size": self._settings.relay_batch_size})
        try:
            while not self._stopping:
                try:
                    await self._serve()
                except Exception as exc:  # the daemon outlives any one failure
                    if self._stopping:
                        break
                    delay = self._reconnect_delay
                    self._reconnect_delay = min(delay * 2, RECONNECT_MAX)
                    log.warning(
                        "database unavailable or batch failed; reconnecting",
                        extra={"event": "relay.reconnect", "error": describe(exc), "retry_in_s": delay},
                        exc_info=not isinstance(exc, _EXPECTED),
                    )
                    # A notification that came in before the failure must not cut the wait short.
                    self._wakeups[0].clear()
                    await self._sleep(0, delay)
        finally:
            await self._publisher.close()
            log.info("relay stopped", extra={"event": "relay.stop"})

    async def _serve(self) -> None:
        connections: list[asyncpg.Connection] = []
        try:
            listen = await connect(self._settings, "relay-listen")
            connections.append(listen)
            for lane in range(len(self._wakeups)):
                connections.append(await connect(self._settings, f"relay-lane-{lane}"))
            await listen.add_listener(OUTBOX_CHANNEL, self._on_notify)
            log.info("connected", extra={"event": "relay.connected"})
            self._reconnect_delay = RECONNECT_INITIAL
            async with asyncio.TaskGroup() as lanes:
                for lane, work in enumerate(connections[1:]):
                    lanes.create_task(self._lane(lane, work, listen))
        except BaseExceptionGroup as group:
            # One lane failing cancels the others; report the first real cause.
            raise group.exceptions[0] from None
        finally:
            for connection in connections:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(connection.close(), timeout=2)

    async def _lane(self, lane: int, work: asyncpg.Connection, listen: asyncpg.Connection) -> None:
        settings = self._settings
        wakeup = self._wakeups[lane]
        last_busy = float("-inf")
        next_reconcile = time.monotonic() + settings.relay_reconcile_interval
        while not self._stopping:
            if work.is_closed() or listen.is_closed():
                raise ConnectionLost("a relay database connection closed")
            # Cleared before the claim: a notification arriving during the batch wakes the next wait.
            wakeup.clear()
            result = await relay_batch(work, self._publisher, settings)
            now = time.monotonic()
            if lane == 0 and now >= next_reconcile:  # also during a backlog, which may last long
                await reconcile(work, settings)
                next_reconcile = now + settings.relay_reconcile_interval
            if result.claimed >= settings.relay_batch_size:
                # A full batch: more rows are probably waiting, so every lane helps.
                for other in self._wakeups:
                    other.set()
                continue
            if lane:
                await self._sleep(lane, settings.relay_poll_interval)
                continue
            if result.claimed:
                last_busy = now
            lingering = now - last_busy < settings.relay_linger
            await self._sleep(0, settings.relay_busy_poll if lingering else settings.relay_poll_interval)

    async def _sleep(self, lane: int, seconds: float) -> None:
        """Wait for the lane's wake-up (a notification, a backlog, stop()) or `seconds`."""
        if self._stopping:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeups[lane].wait(), seconds)

    def _on_notify(self, *_: object) -> None:
        self._wakeups[0].set()


async def run_daemon(settings: Settings) -> None:
    """Run a relay until SIGTERM or SIGINT, then return after a clean stop."""
    relay = Relay(settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, relay.stop)
    await relay.run()
