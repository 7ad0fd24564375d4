"""`python -m relay` as a real process: wake-up, crash, SIGTERM, two relays, outages, reconciler.

Each test uses its own queue on a Redis server of this module's own (stopped and restarted
by the outage test), and the session's test database, truncated per test.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import TypeVar

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from core.contract import OUTBOX_CHANNEL
from core.ledger import Ledger, TransferRequest
from core.outbox import queries
from core.outbox.states import OutboxState
from core.settings import Settings
from relay.db import connect
from tests.support.database import account_holder, funded_account
from tests.support.relays import PrivateRedis, RelayProcess, new_queue, queued_messages, relay_env, start_relay
from tests.support.waiting import until

pytestmark = pytest.mark.e2e
T = TypeVar("T")


@pytest.fixture
def queue() -> str:
    return new_queue()


def env_for(settings: Settings, broker: PrivateRedis, queue: str, **extra: str) -> dict[str, str]:
    return relay_env(settings, broker.url, queue, LOG_JSON="true", **extra)


async def fill(db: asyncpg.Connection, count: int) -> None:
    await db.execute(
        "INSERT INTO outbox (id, task_name, kwargs) "
        "SELECT gen_random_uuid(), 'audit_log_transaction', jsonb_build_object('transaction_id', g::text) "
        "FROM generate_series(1, $1) g",
        count,
    )


def published(db: asyncpg.Connection, at_least: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await count_state(db, OutboxState.PUBLISHED) >= at_least

    return check


def logged(relay: RelayProcess, text: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return text in relay.log()

    return check


async def count_state(db: asyncpg.Connection, state: str) -> int:
    return int(await db.fetchval("SELECT count(*) FROM outbox WHERE state = $1", state))


def json_logs(relay: RelayProcess) -> list[dict[str, object]]:
    return [json.loads(line) for line in relay.log().splitlines() if line.startswith("{")]


def batch_logs(relay: RelayProcess) -> list[dict[str, object]]:
    return [line for line in json_logs(relay) if line.get("event") == "relay.batch"]


async def test_relay_wakes_on_commit_and_publishes_each_transfer_row_once(
    engine: AsyncEngine,
    settings: Settings,
    ledger: Ledger,
    db: asyncpg.Connection,
    broker: PrivateRedis,
    queue: str,
) -> None:
    owner = await account_holder(engine)
    payer = await funded_account(ledger, owner, Decimal("100.00"), email="payer@example.com")
    payee = await funded_account(ledger, owner, Decimal("0.00"), email="payee@example.com")
    await queries.clear(db)  # the deposit's own outbox rows: this test counts the transfers'

    # A long idle poll: only the NOTIFY (or the linger after it) can explain a fast pick-up.
    with start_relay(env_for(settings, broker, queue, RELAY_POLL_INTERVAL="30")) as relay:
        await until(logged(relay, "relay.connected"), 30, "relay connected")
        for _ in range(20):
            await ledger.transfer(TransferRequest(payer, payee, Decimal("1.00")), owner)
            await asyncio.sleep(0.01)
        await until(published(db, 40), 30, "40 rows published")
        lag = await db.fetchval("SELECT max(extract(epoch FROM published_at - created_at)) FROM outbox")
        relay.signal(signal.SIGTERM)
        assert relay.wait(10) == 0
    assert lag < 2.0
    ids = [str(r["id"]) for r in await db.fetch("SELECT id FROM outbox")]
    assert sorted(m.task_id for m in queued_messages(broker.client(), queue)) == sorted(ids)
    batches = batch_logs(relay)
    assert sum(int(str(line["published"])) for line in batches) == 40, batches
    assert all(line["claimed"] for line in batches)  # idle polls are not logged


async def test_sigkill_mid_batch_then_restart_loses_nothing_and_duplicates_only_in_flight_rows(
    settings: Settings, db: asyncpg.Connection, broker: PrivateRedis, queue: str
) -> None:
    """The kill lands inside a batch by construction, not by speed: half the backlog is locked
    (SKIP LOCKED passes it by) until the other half is out, then the broker is frozen, the
    locks released, and the relay killed once it holds a claimed batch it cannot publish."""
    await fill(db, 20_000)
    env = env_for(settings, broker, queue, RELAY_BATCH_SIZE="1000", RELAY_PUBLISH_TIMEOUT="60")
    locker = await connect(settings, "test-locker")
    try:
        held = locker.transaction()
        await held.start()
        await locker.execute("SELECT id FROM outbox ORDER BY id LIMIT 10000 FOR UPDATE")
        with start_relay(env) as relay:
            await until(published(db, 10_000), 30, "the unlocked half published")
            assert broker.process is not None
            broker.process.send_signal(signal.SIGSTOP)  # the broker stops answering, mid-conversation
            try:
                await held.rollback()
                await until(relay_inside_a_batch(db), 30, "a relay session holding a claimed batch")
                relay.signal(signal.SIGKILL)
                relay.wait(10)
            finally:
                broker.process.send_signal(signal.SIGCONT)
    finally:
        await locker.close()
    # The batch in hand when the relay died rolled back: its rows are pending again.
    assert await count_state(db, OutboxState.PUBLISHED) == 10_000
    with start_relay(env) as relay:
        await until(published(db, 20_000), 30, "drained after restart")
        relay.signal(signal.SIGTERM)
        assert relay.wait(10) == 0

    counts = Counter(m.task_id for m in queued_messages(broker.client(), queue))
    ids = {str(r["id"]) for r in await db.fetch("SELECT id FROM outbox")}
    assert set(counts) == ids  # none lost, nothing foreign
    duplicates = [task_id for task_id, n in counts.items() if n > 1]
    assert all(counts[task_id] == 2 for task_id in duplicates)
    # Only the batches in flight when the process died (2 lanes x 1000 rows) can repeat.
    assert len(duplicates) <= 2 * 1000


def relay_inside_a_batch(db: asyncpg.Connection) -> Callable[[], Awaitable[bool]]:
    """A relay session of this database idle inside its transaction: it claimed rows and waits on the broker."""

    async def check() -> bool:
        waiting: int = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE 'relay%' AND state = 'idle in transaction'"
        )
        return waiting > 0

    return check


# README, The relay: "It runs until SIGTERM or SIGINT, then finishes the batch in hand, commits and exits 0."
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_stop_signal_finishes_the_batch_in_hand_and_exits_zero(
    settings: Settings, db: asyncpg.Connection, broker: PrivateRedis, queue: str, stop_signal: signal.Signals
) -> None:
    await fill(db, 20_000)
    with start_relay(env_for(settings, broker, queue, RELAY_BATCH_SIZE="1000")) as relay:
        await until(published(db, 1), 30, "first batch")
        stopped_at = time.monotonic()
        relay.signal(stop_signal)
        assert relay.wait(10) == 0
        assert time.monotonic() - stopped_at < 5
    marked = {str(r["id"]) for r in await db.fetch("SELECT id FROM outbox WHERE state = 'published'")}
    queued = [m.task_id for m in queued_messages(broker.client(), queue)]
    # No half-published batch: what reached the broker is exactly what is marked published.
    assert sorted(queued) == sorted(marked)
    assert 0 < len(marked) < 20_000
    assert "relay stopped" in relay.log()


async def test_two_relays_share_a_backlog_each_row_once_and_both_work(
    settings: Settings, db: asyncpg.Connection, broker: PrivateRedis, queue: str
) -> None:
    await fill(db, 20_000)
    env = env_for(settings, broker, queue, RELAY_BATCH_SIZE="200")
    with start_relay(env) as first, start_relay(env) as second:
        await until(published(db, 20_000), 30, "drained by two relays")
        for relay in (first, second):
            relay.signal(signal.SIGTERM)
        assert (first.wait(10), second.wait(10)) == (0, 0)
    counts = Counter(m.task_id for m in queued_messages(broker.client(), queue))
    assert len(counts) == 20_000
    assert set(counts.values()) == {1}
    work = [sum(int(str(line["published"])) for line in batch_logs(relay)) for relay in (first, second)]
    assert sum(work) == 20_000
    assert min(work) > 0, work


async def test_broker_outage_pauses_publishing_without_counting_then_drains_and_database_drop_reconnects(
    settings: Settings, db: asyncpg.Connection, broker: PrivateRedis, queue: str
) -> None:
    env = env_for(
        settings,
        broker,
        queue,
        RELAY_BACKOFF_BASE="0.05",
        RELAY_BACKOFF_MAX="0.2",
        RELAY_MAX_ATTEMPTS="2",
        RELAY_PUBLISH_TIMEOUT="1",
    )
    with start_relay(env) as relay:
        await until(logged(relay, "relay.connected"), 30, "relay connected")
        broker.stop()
        try:
            await fill(db, 50)
            await until(logged(relay, "relay.broker_unreachable"), 30, "the relay noticed the outage")
            await asyncio.sleep(3)  # about 15 probes at the 0.2 s cap, far past RELAY_MAX_ATTEMPTS
            rows = await db.fetch("SELECT state, attempts, published_at, last_error FROM outbox")
            assert {(r["state"], r["attempts"], r["published_at"], r["last_error"]) for r in rows} == {
                (OutboxState.PENDING, 0, None, None)
            }
            assert relay.process.poll() is None  # still running
        finally:
            broker.start()
        await until(published(db, 50), 30, "drained after the outage")

        # The database drops the relay's connections: it reconnects and goes on.
        await db.execute(
            "SELECT pg_terminate_backend(pid)"
            " FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE 'relay%'"
        )
        await fill(db, 10)
        await until(published(db, 60), 30, "published after reconnect")
        relay.signal(signal.SIGTERM)
        assert relay.wait(10) == 0
    counts = Counter(m.task_id for m in queued_messages(broker.client(), queue))
    assert len(counts) == 60
    assert set(counts.values()) == {1}
    events = Counter(line.get("event") for line in json_logs(relay))
    assert (events["relay.broker_unreachable"], events["relay.broker_reachable"]) == (1, 1)
    assert events["relay.publish_failed"] == 0
    assert "relay.reconnect" in relay.log()


async def test_reconciler_republishes_a_message_the_broker_keeps_losing_then_gives_up(
    settings: Settings, db: asyncpg.Connection, broker: PrivateRedis, queue: str
) -> None:
    env = env_for(settings, broker, queue, RELAY_COMPLETION_DEADLINE="0.3", RELAY_MAX_REPUBLISHES="2")
    await fill(db, 1)
    client = broker.client()
    with start_relay(env) as relay:

        async def lost_for_good() -> asyncpg.Record | None:
            client.delete(queue)  # the broker loses every copy (a flush, a restart without persistence)
            return await db.fetchrow("SELECT id, state, republishes, last_error FROM outbox WHERE state = 'dead'")

        row = await until(lost_for_good, 30, "dead after re-publishes")
        relay.signal(signal.SIGTERM)
        assert relay.wait(10) == 0
    assert row is not None
    assert row["republishes"] == 2
    assert row["last_error"] == "message gone after 2 re-publishes: queue empty"
    published_lines = [line for line in batch_logs(relay) if line["published"]]
    assert len(published_lines) == 3  # published once, re-published twice, with the same task id
    # Every re-publish and the final verdict were about this row, as the reconciler saw it.
    reconciled = [line for line in json_logs(relay) if line.get("event") == "relay.reconciled"]
    assert [(line["outbox_id"], line["state"]) for line in reconciled] == [
        (str(row["id"]), OutboxState.PENDING),
        (str(row["id"]), OutboxState.PENDING),
        (str(row["id"]), OutboxState.DEAD),
    ], reconciled


async def test_a_queued_message_is_not_republished_however_long_it_waits(
    settings: Settings, db: asyncpg.Connection, broker: PrivateRedis, queue: str
) -> None:
    env = env_for(settings, broker, queue, RELAY_COMPLETION_DEADLINE="0.3", RELAY_RECONCILE_INTERVAL="0.1")
    await fill(db, 5)
    with start_relay(env) as relay:
        await until(published(db, 5), 30, "published")
        await asyncio.sleep(3)  # ten deadlines, thirty reconcile passes, and no worker
        relay.signal(signal.SIGTERM)
        assert relay.wait(10) == 0
    rows = await db.fetch("SELECT state, republishes FROM outbox")
    assert {(r["state"], r["republishes"]) for r in rows} == {(OutboxState.PUBLISHED, 0)}
    assert len(queued_messages(broker.client(), queue)) == 5


async def lane_idle_for(db: asyncpg.Connection, seconds: float) -> bool:
    """Whether the relay's polling lane (lane 0) has run no statement for `seconds`: it stopped lingering."""
    return bool(
        await db.fetchval(
            "SELECT clock_timestamp() - state_change > make_interval(secs => $1) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'relay-lane-0' AND state = 'idle'",
            seconds,
        )
    )


async def lane_statement(db: asyncpg.Connection) -> str:
    """The statement the relay's polling lane (lane 0) runs or ran last."""
    return str(
        await db.fetchval(
            "SELECT query FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'relay-lane-0'"
        )
    )


async def test_the_linger_picks_up_rows_without_a_notify_then_an_idle_relay_waits_for_one(
    settings: Settings, db: asyncpg.Connection, broker: PrivateRedis, queue: str
) -> None:
    # The idle poll (and the reconciler, which runs after a batch) every 60 s: within this test only
    # a NOTIFY, or the linger after the batch it woke, can explain a pick-up.
    linger = 3.0
    env = env_for(
        settings,
        broker,
        queue,
        RELAY_POLL_INTERVAL="60",
        RELAY_RECONCILE_INTERVAL="60",
        RELAY_LINGER=str(linger),
        RELAY_BUSY_POLL="0.01",
    )
    notified: list[str] = []
    listen = await connect(settings, "test-listen")
    await listen.add_listener(OUTBOX_CHANNEL, lambda *args: notified.append(args[-1]))
    try:
        with start_relay(env) as relay:
            await until(logged(relay, "relay.connected"), 30, "relay connected (and listening)")
            async with db.transaction():
                await fill(db, 1)
                await db.execute("SELECT pg_notify($1, 'first')", OUTBOX_CHANNEL)
            await until(published(db, 1), 20, "the notified row published")

            # Committed just after the notified batch, with no NOTIFY (as a coalesced transfer is):
            # the lingering relay still publishes it, long before its next idle poll.
            await fill(db, 1)
            await until(published(db, 2), 20, "the un-notified row published while the relay lingers")
            # Lingering with nothing due, each poll is the one-statement question: no claim, no transaction.
            await asyncio.sleep(0.2)
            seen = Counter[str]()
            for _ in range(50):
                seen[await lane_statement(db)] += 1
                await asyncio.sleep(0.02)
            assert set(seen) == {queries._ANY_DUE}, seen

            # The linger runs out: lane 0 stops polling and sleeps for RELAY_POLL_INTERVAL.
            await until(lambda: lane_idle_for(db, 1.0), linger + 20, f"the relay to go idle after its {linger}s linger")
            await fill(db, 1)
            await asyncio.sleep(linger + 1)  # observing absence: nothing wakes an idle relay but a NOTIFY or the poll
            assert await count_state(db, OutboxState.PENDING) == 1, "an idle relay published a row nobody notified"

            await db.execute("SELECT pg_notify($1, 'wake')", OUTBOX_CHANNEL)
            await until(published(db, 3), 20, "the row published after the NOTIFY")
            relay.signal(signal.SIGTERM)
            assert relay.wait(10) == 0
        await until(lambda: "wake" in notified, 30, "the test's listener to hear the last NOTIFY")
        assert notified == ["first", "wake"], "only the test's own NOTIFYs were sent"
    finally:
        await listen.close()
