"""The relay's main loop: wake on NOTIFY or poll, relay batches, reconcile, survive outages.

Wake-up policy: the API sends a coalesced NOTIFY at commit; the relay LISTENs on its own
connection. After a non-empty batch it keeps polling every RELAY_BUSY_POLL for RELAY_LINGER,
so rows committed just after a coalesced (skipped) notification still go out at once; when
idle it polls every RELAY_POLL_INTERVAL as a fallback. A lost notification or a dropped LISTEN
connection therefore only delays a row, never loses it. A poll that no notification or backlog
prompted first asks whether anything is due (one statement, no transaction) and claims only if
so: most busy polls find nothing, and a claim costs three round trips.

Broker outages: when a batch finds the broker unreachable, its rows are left untouched (no
attempt counted) and every lane stops claiming. One prober asks the broker at capped backoff
(core.backoff: RELAY_BACKOFF_BASE doubling, capped at min(RELAY_BACKOFF_MAX, PROBE_MAX)); the
lanes sleep on an event meanwhile, so an outage of any length costs neither CPU nor rows. The
relay logs once when the broker goes away and once when a batch succeeds after it answered again.

Database outages: any failure of a lane closes every connection and reconnects with backoff;
the backoff resets only after a batch succeeds, so a failure that repeats on every batch waits
longer and longer instead of spinning.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time

import asyncpg

from core.backoff import backoff_delay
from core.contract import OUTBOX_CHANNEL
from core.logging import describe
from core.metrics import start_metrics_server
from core.outbox.queries import any_due
from core.settings import Settings
from core.telemetry import RELAY_SERVICE, configure_tracing, flush_tracing
from core.transient import CONNECTION_ERRORS
from relay.batch import BatchResult, BeforeCommit, relay_batch
from relay.broker import QueueInspector, create_inspector
from relay.db import connect
from relay.metrics import RelayMetrics
from relay.publisher import Publisher, create_publisher
from relay.reconciler import reconcile

log = logging.getLogger("relay.daemon")

NOTHING_DUE = BatchResult(0, 0, 0, 0, 0.0)

# Concurrent batches per relay process: two overlap Python work with database round trips.
LANES = 2
RECONNECT_INITIAL = 0.5
RECONNECT_MAX = 10.0
# The longest pause between two probes of an unreachable broker, whatever RELAY_BACKOFF_MAX says:
# a probe costs one connection attempt, and the backlog should start draining soon after it returns.
PROBE_MAX = 5.0
# Test-only: seconds to hold the first batch that published something open before its commit
# (see hold_hook_from_environment). Never set it in production.
HOLD_ENV = "RELAY_TEST_HOLD_BEFORE_COMMIT"


class BrokerWatch:
    """Whether the broker is believed reachable, and the one prober that runs while it is not.

    A lane that finds the broker unreachable calls lost(); lanes then wait() instead of claiming.
    The prober asks the broker at capped backoff and releases the lanes when it answers; the
    outage ends (logged once) when a batch next succeeds, or goes on at the next backoff step if
    that batch finds it unreachable again, so a flapping broker is not logged on every flap.
    """

    def __init__(self, publisher: Publisher, settings: Settings, metrics: RelayMetrics | None = None) -> None:
        self._publisher = publisher
        self._metrics = metrics
        self._base = settings.relay_backoff_base
        self._cap = min(settings.relay_backoff_max, PROBE_MAX)
        self._reachable = asyncio.Event()
        self._reachable.set()
        self._failures = 0
        self._since: float | None = None  # monotonic start of the current outage
        self._prober: asyncio.Task[None] | None = None

    @property
    def reachable(self) -> bool:
        return self._reachable.is_set()

    async def wait(self) -> None:
        await self._reachable.wait()

    def release(self) -> None:
        """Wake the waiting lanes (stop() does, so that they can exit)."""
        self._reachable.set()

    def lost(self, error: str) -> None:
        if self._metrics is not None:
            self._metrics.broker_contact(ok=False)
        self._failures += 1
        if self._since is None:
            self._since = time.monotonic()
            log.warning(
                "broker unreachable; publishing paused, probing",
                extra={"event": "relay.broker_unreachable", "error": error},
            )
        self._reachable.clear()
        if self._prober is None or self._prober.done():
            self._prober = asyncio.create_task(self._probe(), name="relay-broker-probe")

    def succeeded(self) -> None:
        """A batch ran without finding the broker unreachable."""
        if self._since is None:
            return
        log.info(
            "broker reachable again; publishing resumed",
            extra={"event": "relay.broker_reachable", "outage_s": round(time.monotonic() - self._since, 3)},
        )
        self._since = None
        self._failures = 0

    async def _probe(self) -> None:
        while True:
            await asyncio.sleep(backoff_delay(self._failures, base=self._base, cap=self._cap))
            if await self._publisher.probe() is None:
                if self._metrics is not None:
                    self._metrics.broker_contact(ok=True)
                self._reachable.set()
                return
            self._failures += 1

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober


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

    def __init__(
        self,
        settings: Settings,
        publisher: Publisher | None = None,
        lanes: int = LANES,
        *,
        inspector: QueueInspector | None = None,
        before_commit: BeforeCommit | None = None,
        metrics: RelayMetrics | None = None,
    ) -> None:
        self._settings = settings
        self._publisher = publisher or create_publisher(settings)
        self._inspector = inspector or create_inspector(settings)
        self._before_commit = before_commit
        self._metrics = metrics
        self._broker = BrokerWatch(self._publisher, settings, metrics)
        self._last_contact = float("-inf")  # monotonic time of the last batch the broker accepted rows of
        self._wakeups = [asyncio.Event() for _ in range(lanes)]
        self._stopping = False
        self._stopped = asyncio.Event()
        self._reconnect_delay = RECONNECT_INITIAL

    def stop(self) -> None:
        """Ask the relay to exit after the batches in hand. Safe to call from a signal handler."""
        if not self._stopping:
            log.info("stopping after the current batch", extra={"event": "relay.stopping"})
        self._stopping = True
        self._stopped.set()
        self._broker.release()
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
            await self._broker.close()
            await self._publisher.close()
            await self._inspector.close()
            log.info("relay stopped", extra={"event": "relay.stop"})

    async def _serve(self) -> None:
        connections: list[asyncpg.Connection] = []
        try:
            listen = await connect(self._settings, "relay-listen")
            connections.append(listen)
            for lane in range(len(self._wakeups)):
                connections.append(await connect(self._settings, f"relay-lane-{lane}"))
            sampling = await connect(self._settings, "relay-metrics") if self._metrics is not None else None
            if sampling is not None:
                connections.append(sampling)
            await listen.add_listener(OUTBOX_CHANNEL, self._on_notify)
            log.info("connected", extra={"event": "relay.connected"})
            async with asyncio.TaskGroup() as lanes:
                for lane, work in enumerate(connections[1 : 1 + len(self._wakeups)]):
                    lanes.create_task(self._lane(lane, work, listen))
                if sampling is not None and self._metrics is not None:
                    lanes.create_task(self._sample(self._metrics, sampling))
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
        prompted = True  # by a notification, a backlog or a (re)start: claim without asking first
        while not self._stopping:
            if work.is_closed() or listen.is_closed():
                raise ConnectionLost("a relay database connection closed")
            if not self._broker.reachable:
                await self._broker.wait()  # the prober (or stop()) releases the lanes
                prompted = True
                continue
            # Cleared before the claim: a notification arriving during the batch wakes the next wait.
            wakeup.clear()
            if prompted or await any_due(work):
                result = await relay_batch(work, self._publisher, settings, self._before_commit, self._metrics)
            else:
                result = NOTHING_DUE
            prompted = True
            self._reconnect_delay = RECONNECT_INITIAL  # a batch succeeded: the database is fine
            if result.unreachable is not None:
                self._broker.lost(result.unreachable)
                continue
            self._broker.succeeded()
            now = time.monotonic()
            if result.published and self._metrics is not None:
                self._metrics.broker_contact(ok=True)
                self._last_contact = now
            if lane == 0 and now >= next_reconcile:  # also during a backlog, which may last long
                reconciled = await reconcile(work, self._inspector, settings)
                if self._metrics is not None:
                    self._metrics.reconciled(reconciled.republished, reconciled.dead)
                next_reconcile = now + settings.relay_reconcile_interval
            if result.claimed >= settings.relay_batch_size:
                # A full batch: more rows are probably waiting, so every lane helps.
                for other in self._wakeups:
                    other.set()
                continue
            if lane:
                prompted = await self._sleep(lane, settings.relay_poll_interval)
                continue
            if result.claimed:
                last_busy = now
            lingering = now - last_busy < settings.relay_linger
            prompted = await self._sleep(0, settings.relay_busy_poll if lingering else settings.relay_poll_interval)

    async def _sample(self, metrics: RelayMetrics, connection: asyncpg.Connection) -> None:
        """Every RELAY_METRICS_INTERVAL: the table-wide figures (the queries of `relay status`) and, when no
        batch reached the broker meanwhile, a probe of it, so `outbox_broker_up` is current while idle.
        The probe only informs the gauge; the lanes find an outage themselves at their next publish."""
        interval = self._settings.relay_metrics_interval
        while not self._stopping:
            if connection.is_closed():
                raise ConnectionLost("the relay's metrics connection closed")
            try:
                await metrics.sample(connection)
            except asyncpg.PostgresError as exc:  # e.g. a statement timeout on a huge table: try again later
                if isinstance(exc, CONNECTION_ERRORS):
                    raise
                log.warning(
                    "could not sample the outbox figures",
                    extra={"event": "relay.sample_failed", "error": describe(exc)},
                )
            if self._broker.reachable and time.monotonic() - self._last_contact > interval:
                metrics.broker_contact(ok=await self._publisher.probe() is None)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), interval)

    async def _sleep(self, lane: int, seconds: float) -> bool:
        """Wait for the lane's wake-up (a notification, a backlog, stop()) or `seconds`: whether it woke."""
        if self._stopping:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeups[lane].wait(), seconds)
        return self._wakeups[lane].is_set()

    def _on_notify(self, *_: object) -> None:
        self._wakeups[0].set()


def hold_hook_from_environment() -> BeforeCommit | None:
    """The frozen-relay test's hook, when RELAY_TEST_HOLD_BEFORE_COMMIT is set (seconds).

    The first batch that published something logs `relay.test_hold` and then waits that long
    inside its transaction, after its messages reached the broker and before its commit: the
    test SIGSTOPs the relay when it sees the line, which freezes it at exactly that point.
    Later batches are not held.
    """
    seconds = float(os.environ.get(HOLD_ENV) or 0)
    if seconds <= 0:
        return None
    held = False

    async def hold(result: BatchResult) -> None:
        nonlocal held
        if held or not result.published:
            return
        held = True
        log.warning(
            "test hook: holding the batch transaction before its commit",
            extra={"event": "relay.test_hold", "published": result.published, "hold_s": seconds},
        )
        await asyncio.sleep(seconds)

    return hold


async def run_daemon(settings: Settings) -> None:
    """Run a relay until SIGTERM or SIGINT, then return after a clean stop.

    Tracing is configured first (the publisher's spans follow it); metrics are served on
    RELAY_METRICS_PORT unless it is 0, which also leaves the figures unsampled.
    """
    provider = configure_tracing(RELAY_SERVICE)
    metrics = RelayMetrics() if settings.relay_metrics_port else None
    server = (
        start_metrics_server(metrics.registry, settings.relay_metrics_port, variable="RELAY_METRICS_PORT")
        if metrics
        else None
    )
    try:
        relay = Relay(settings, before_commit=hold_hook_from_environment(), metrics=metrics)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, relay.stop)
        await relay.run()
    finally:
        if server is not None:
            server.close()
        flush_tracing(provider)
