"""The relay's batch, publishers and reconciler, in-process, on real PostgreSQL and a private Redis.

Each test truncates the tables (the `engine` fixture) and uses its own queue on a Redis server
of this module's own, so other test sessions cannot touch the messages checked here.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import struct
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from core.ledger import Ledger, TransferRequest
from core.outbox import queries
from core.outbox.queries import Evidence, QueueObservation, claim_pending
from core.outbox.states import OutboxState
from core.settings import Settings
from devservers.embedded import free_port
from relay import operator
from relay.batch import BatchResult, relay_batch
from relay.broker import RedisQueueInspector, create_inspector
from relay.celery_app import create_celery_app
from relay.db import connect
from relay.publisher import Publisher, RedisBatchPublisher, SendTaskPublisher, Unsent, create_publisher
from relay.reconciler import order_margin, reconcile
from tests.support.database import account_holder, fetch, funded_account
from tests.support.outbox import insert_outbox_row
from tests.support.relays import PrivateRedis, new_queue, queued_messages
from tests.support.waiting import until
from tests.support.workers import start_worker, worker_env, worker_settings

INSERT = "INSERT INTO outbox (id, task_name, kwargs, created_at) VALUES ($1, $2, $3::jsonb, $4)"


@pytest.fixture
def relay_settings(settings: Settings, broker: PrivateRedis) -> Settings:
    return settings.model_copy(
        update={
            "celery_broker_url_override": broker.url,
            "celery_task_queue": new_queue(),
            "relay_backoff_base": 0.01,
            "relay_backoff_max": 0.02,
            "relay_publish_timeout": 1.0,
            "relay_max_attempts": 3,
        }
    )


@pytest.fixture
async def publisher(relay_settings: Settings) -> AsyncIterator[Publisher]:
    created = create_publisher(relay_settings)
    yield created
    await created.close()


async def insert_rows(db: asyncpg.Connection, count: int, task_name: str = "audit_log_transaction") -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in range(count)]
    await db.executemany(
        "INSERT INTO outbox (id, task_name, kwargs) VALUES ($1, $2, $3)",
        [(row_id, task_name, {"transaction_id": str(row_id), "n": n}) for n, row_id in enumerate(ids)],
    )
    return ids


async def drain(db: asyncpg.Connection, publisher: Publisher, settings: Settings) -> list[BatchResult]:
    results = []
    while (result := await relay_batch(db, publisher, settings)).claimed:
        results.append(result)
    return results


async def states(db: asyncpg.Connection) -> dict[uuid.UUID, asyncpg.Record]:
    rows = await db.fetch("SELECT id, state, attempts, republishes, last_error, published_at FROM outbox")
    return {row["id"]: row for row in rows}


async def test_committed_transfers_are_published_once_with_name_kwargs_and_task_id(
    engine: AsyncEngine,
    relay_settings: Settings,
    ledger: Ledger,
    db: asyncpg.Connection,
    publisher: Publisher,
    broker: PrivateRedis,
) -> None:
    owner = await account_holder(engine)
    payer = await funded_account(ledger, owner, Decimal("100.00"), email="payer@example.com")
    payee = await funded_account(ledger, owner, Decimal("0.00"), email="payee@example.com")
    await queries.clear(db)  # the deposit's own outbox rows: this test counts the transfers'

    for _ in range(15):
        await ledger.transfer(TransferRequest(payer, payee, Decimal("1.25")), owner)

    await drain(db, publisher, relay_settings)

    rows = await db.fetch("SELECT id, task_name, kwargs, state, attempts, published_at FROM outbox")
    assert len(rows) == 30
    messages = queued_messages(broker.client(), relay_settings.celery_task_queue)
    assert sorted(m.task_id for m in messages) == sorted(str(r["id"]) for r in rows)  # each exactly once
    by_id = {m.task_id: m for m in messages}
    for row in rows:
        message = by_id[str(row["id"])]
        assert message.task_name == row["task_name"]
        assert message.kwargs == row["kwargs"]
        assert message.body[0] == []
        assert (row["state"], row["attempts"]) == (OutboxState.PUBLISHED, 1)
        assert row["published_at"] is not None


async def test_uncommitted_and_rolled_back_rows_are_never_published_and_late_commits_are(
    relay_settings: Settings, db: asyncpg.Connection, publisher: Publisher, broker: PrivateRedis
) -> None:
    long_open = await connect(relay_settings, "test-long-open")
    rolled_back = await connect(relay_settings, "test-rolled-back")
    early, never, later = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    try:
        open_txn = long_open.transaction()
        await open_txn.start()
        await long_open.execute(INSERT, early, "audit_log_transaction", "{}", await long_open.fetchval("SELECT now()"))
        doomed = rolled_back.transaction()
        await doomed.start()
        await rolled_back.execute(
            INSERT, never, "audit_log_transaction", "{}", await rolled_back.fetchval("SELECT now()")
        )
        await drain(db, publisher, relay_settings)  # runs while both are open
        await doomed.rollback()
        await db.execute(INSERT, later, "audit_log_transaction", {}, await db.fetchval("SELECT now()"))

        await drain(db, publisher, relay_settings)
        assert [m.task_id for m in queued_messages(broker.client(), relay_settings.celery_task_queue)] == [str(later)]

        await open_txn.commit()
        await drain(db, publisher, relay_settings)
    finally:
        await long_open.close()
        await rolled_back.close()

    published = [m.task_id for m in queued_messages(broker.client(), relay_settings.celery_task_queue)]
    assert published == [str(later), str(early)]
    created = {r["id"]: r["created_at"] for r in await db.fetch("SELECT id, created_at FROM outbox")}
    assert created[early] < created[later]  # older than a row already published, and still not lost
    assert never not in created


POISON = {
    "undecodable number": ("audit_log_transaction", '{"a": 1e5000}', "undecodable kwargs"),
    "undecodable nesting": ("audit_log_transaction", '{"a": ' + "[" * 5000 + "]" * 5000 + "}", "undecodable kwargs"),
    "not an object": ("audit_log_transaction", "[1, 2]", "kwargs must be a JSON object, got list"),
    "unknown task": ("no_such_task", "{}", "task 'no_such_task' is not in the contract"),
}


async def test_poison_rows_are_dead_at_once_with_their_reason_and_the_rest_of_the_batch_goes_out(
    relay_settings: Settings, db: asyncpg.Connection, publisher: Publisher, broker: PrivateRedis
) -> None:
    poison = {}
    for name, (task_name, kwargs, _) in POISON.items():
        poison[name] = uuid.uuid4()
        await db.execute(
            "INSERT INTO outbox (id, task_name, kwargs) VALUES ($1, $2, $3::text::jsonb)",
            poison[name],
            task_name,
            kwargs,
        )
    good = await insert_rows(db, 5)

    result = await relay_batch(db, publisher, relay_settings)

    assert (result.claimed, result.published, result.failed, result.poisoned) == (9, 5, 0, 4)
    rows = await states(db)
    for name, (_, _, reason) in POISON.items():
        row = rows[poison[name]]
        assert (row["state"], row["attempts"]) == (OutboxState.DEAD, 0), name
        assert row["last_error"].startswith("poison row: "), row["last_error"]
        assert reason in row["last_error"], row["last_error"]
    assert all(rows[row_id]["state"] == OutboxState.PUBLISHED for row_id in good)
    queued = [m.task_id for m in queued_messages(broker.client(), relay_settings.celery_task_queue)]
    assert sorted(queued) == sorted(map(str, good))
    assert (await relay_batch(db, publisher, relay_settings)).claimed == 0  # dead rows are not tried again

    assert await operator.replay(db, io.StringIO(), io.StringIO(), [poison["not an object"]], []) == 0
    replayed = (await states(db))[poison["not an object"]]
    assert (replayed["state"], replayed["attempts"]) == (OutboxState.PENDING, 0)


async def test_a_message_the_broker_refuses_counts_attempts_and_dies_after_max_attempts(
    relay_settings: Settings, db: asyncpg.Connection, publisher: Publisher, broker: PrivateRedis
) -> None:
    # The queue's key holds a string: Redis refuses the LPUSH of these messages (WRONGTYPE), but
    # the broker is up and answers. That is a refusal, which counts, not an outage, which does not.
    client = broker.client()
    client.set(relay_settings.celery_task_queue, "not a list")
    ids = await insert_rows(db, 3)
    try:
        for _ in range(relay_settings.relay_max_attempts):
            result = await relay_batch(db, publisher, relay_settings)
            assert (result.claimed, result.failed, result.unreachable) == (3, 3, None)
            await asyncio.sleep(0.05)  # past the (short) backoff
    finally:
        client.delete(relay_settings.celery_task_queue)
    rows = await states(db)
    assert {(rows[i]["state"], rows[i]["attempts"]) for i in ids} == {(OutboxState.DEAD, 3)}
    assert all("WRONGTYPE" in rows[i]["last_error"] for i in ids)


@pytest.mark.parametrize("fast", [True, False], ids=["redis-pipeline", "send_task"])
async def test_an_unreachable_broker_counts_no_attempt_publishes_nothing_then_drains(
    relay_settings: Settings, db: asyncpg.Connection, broker: PrivateRedis, fast: bool
) -> None:
    refusing = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    down = relay_settings.model_copy(update={"celery_broker_url_override": refusing, "relay_fast_publish": fast})
    up = relay_settings.model_copy(update={"relay_fast_publish": fast})
    ids = await insert_rows(db, 20)
    failing = create_publisher(down)
    assert isinstance(failing, RedisBatchPublisher if fast else SendTaskPublisher)
    try:
        # Far more batches than RELAY_MAX_ATTEMPTS (3): an outage of any length kills no row.
        for _ in range(5):
            result = await relay_batch(db, failing, down)
            assert (result.claimed, result.published, result.failed, result.dead) == (20, 0, 0, 0)
            assert "broker" in str(result.unreachable)
        assert await failing.probe() is not None
    finally:
        await failing.close()

    rows = await states(db)
    assert {(r["state"], r["attempts"], r["last_error"]) for r in rows.values()} == {(OutboxState.PENDING, 0, None)}
    assert all(r["published_at"] is None for r in rows.values())
    assert queued_messages(broker.client(), relay_settings.celery_task_queue) == []

    working = create_publisher(up)
    try:
        assert await working.probe() is None
        await drain(db, working, up)
    finally:
        await working.close()
    rows = await states(db)
    assert {(r["state"], r["attempts"]) for r in rows.values()} == {(OutboxState.PUBLISHED, 1)}
    queued = [m.task_id for m in queued_messages(broker.client(), relay_settings.celery_task_queue)]
    assert sorted(queued) == sorted(map(str, ids))


@pytest.mark.parametrize("fast", [True, False], ids=["redis-pipeline", "send_task"])
async def test_a_publisher_recovers_when_its_broker_comes_back(
    relay_settings: Settings, db: asyncpg.Connection, broker: PrivateRedis, fast: bool
) -> None:
    settings = relay_settings.model_copy(update={"relay_fast_publish": fast})
    publisher = create_publisher(settings)
    try:
        await insert_rows(db, 2)
        assert (await relay_batch(db, publisher, settings)).published == 2
        broker.stop()
        try:
            await insert_rows(db, 2)
            assert (await relay_batch(db, publisher, settings)).unreachable is not None
            assert await publisher.probe() is not None
        finally:
            broker.start()
        assert await publisher.probe() is None
        assert (await relay_batch(db, publisher, settings)).published == 2
    finally:
        await publisher.close()


@pytest.mark.parametrize("fast", [True, False], ids=["redis-pipeline", "send_task"])
async def test_a_hung_broker_times_out_instead_of_stalling(
    relay_settings: Settings, db: asyncpg.Connection, fast: bool
) -> None:
    # A listening socket that never answers: connect succeeds, every read hangs.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(100)
        hung = relay_settings.model_copy(
            update={
                "celery_broker_url_override": f"redis://127.0.0.1:{silent.getsockname()[1]}/0",
                "relay_fast_publish": fast,
                "relay_publish_timeout": 0.5,
            }
        )
        await insert_rows(db, 3)
        publisher = create_publisher(hung)
        started = time.monotonic()
        try:
            result = await relay_batch(db, publisher, hung)
        finally:
            await publisher.close()
        assert time.monotonic() - started < 5
    assert (result.claimed, result.failed) == (3, 0)
    assert result.unreachable is not None  # a timeout is the broker not answering, not a refusal
    assert {(r["state"], r["attempts"]) for r in (await states(db)).values()} == {(OutboxState.PENDING, 0)}


async def test_two_concurrent_claims_never_take_the_same_row(relay_settings: Settings, db: asyncpg.Connection) -> None:
    await insert_rows(db, 10)
    other = await connect(relay_settings, "test-other-relay")
    try:
        async with db.transaction(), other.transaction():
            mine = await claim_pending(db, 6)
            theirs = await claim_pending(other, 6)
    finally:
        await other.close()
    assert len(mine) == 6
    assert len(theirs) == 4
    assert not {r.id for r in mine} & {r.id for r in theirs}


async def test_claim_marks_the_dead_entries_of_rows_that_left_the_queue_so_later_claims_skip_them(
    db: asyncpg.Connection,
) -> None:
    # Rows that went pending -> published -> completed leave dead entries in the claim's partial
    # index until a vacuum. A bitmap scan would visit all of them on every claim.
    await db.execute("ALTER TABLE outbox SET (autovacuum_enabled = off)")  # no vacuum mid-test
    await insert_rows(db, 20_000)
    await db.execute("UPDATE outbox SET state = 'published', published_at = now()")
    await db.execute("UPDATE outbox SET state = 'completed', completed_at = now()")
    await insert_rows(db, 2)

    async def claim_plan() -> dict[str, Any]:
        async with db.transaction():  # the claim's locks last until the transaction ends
            explained = await db.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {queries._CLAIM}", 500)
        plan: dict[str, Any] = json.loads(explained)[0]["Plan"]
        return plan

    def scans(plan: dict[str, Any]) -> list[dict[str, Any]]:
        return [plan, *(node for child in plan.get("Plans", []) for node in scans(child))]

    first, later = await claim_plan(), await claim_plan()
    assert {n["Node Type"] for n in scans(later) if "Scan" in n["Node Type"]} == {"Index Scan"}
    assert [n["Index Name"] for n in scans(later) if n["Node Type"] == "Index Scan"] == ["ix_outbox_due"]
    assert later["Shared Hit Blocks"] < first["Shared Hit Blocks"] / 4, (first, later)


async def test_claim_never_switches_to_a_generic_plan_under_sustained_use(
    relay_settings: Settings, db: asyncpg.Connection, publisher: Publisher
) -> None:
    # The pitfall: prepared on an empty table, then run many times, PostgreSQL may pick a generic
    # plan that ignores the partial index. The relay's connections force custom plans.
    for _ in range(12):
        await relay_batch(db, publisher, relay_settings)
    await db.execute(
        "INSERT INTO outbox (id, task_name, kwargs, state) "
        "SELECT gen_random_uuid(), 'audit_log_transaction', '{}', 'completed' FROM generate_series(1, 30000)"
    )
    await insert_rows(db, 100)
    await db.execute("ANALYZE outbox")
    for _ in range(10):
        await relay_batch(db, publisher, relay_settings.model_copy(update={"relay_batch_size": 10}))
    assert await db.fetchval("SHOW plan_cache_mode") == "force_custom_plan"
    plans = await db.fetch(
        "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
        "WHERE statement LIKE '%SKIP LOCKED%' AND statement NOT LIKE '%pg_prepared_statements%'"
    )
    assert plans
    assert all(p["generic_plans"] == 0 for p in plans), plans
    assert max(p["custom_plans"] for p in plans) >= 20, plans
    started = time.perf_counter()
    async with db.transaction():
        assert await claim_pending(db, 500) == []  # all 100 went out in the ten batches above
    assert time.perf_counter() - started < 0.5


async def published_row(
    db: asyncpg.Connection,
    age_s: float,
    state: str = OutboxState.PUBLISHED,
    republishes: int = 0,
    *,
    started_ago: float | None = None,
    lease_left: float = 0.0,
) -> uuid.UUID:
    """A row published `age_s` ago; with `started_ago`, a delivery started then, alive `lease_left` more."""
    row_id = uuid.uuid4()
    await db.execute(
        "INSERT INTO outbox (id, task_name, kwargs, state, attempts, republishes, published_at, completed_at, "
        "delivery_started_at, delivery_lease_until) "
        "VALUES ($1, 'audit_log_transaction', '{}', $2::text, 1, $3, now() - make_interval(secs => $4), "
        "CASE WHEN $2::text = 'completed' THEN now() END, "
        "now() - make_interval(secs => $5), now() + make_interval(secs => $6))",
        row_id,
        state,
        republishes,
        age_s,
        started_ago,
        lease_left,
    )
    return row_id


def judge(
    settings: Settings, queue: QueueObservation, max_republishes: int = 2
) -> Callable[[asyncpg.Connection], Awaitable[list[queries.Reconciled]]]:
    async def run(db: asyncpg.Connection) -> list[queries.Reconciled]:
        return await queries.reconcile_published(
            db,
            deadline=60,
            limit=100,
            max_republishes=max_republishes,
            queue=queue,
            order_margin=order_margin(settings),
        )

    return run


EMPTY = QueueObservation(empty=True, held=frozenset())
BUSY = QueueObservation(empty=False, held=frozenset())
UNKNOWN = QueueObservation(empty=None, held=None)


async def test_a_queued_message_is_never_republished_however_old(
    relay_settings: Settings, db: asyncpg.Connection
) -> None:
    waiting = await published_row(db, 86_400)  # a day in a queue that never empties
    for queue in (BUSY, UNKNOWN):
        assert await judge(relay_settings, queue)(db) == []
    assert (await states(db))[waiting]["state"] == OutboxState.PUBLISHED


async def test_a_row_whose_queue_is_empty_is_republished_then_dies_and_others_are_left(
    relay_settings: Settings, db: asyncpg.Connection
) -> None:
    gone = await published_row(db, 120)
    exhausted = await published_row(db, 120, republishes=2)
    recent = await published_row(db, 10)
    held = await published_row(db, 120)  # a worker took it and has not started it yet
    running = await published_row(db, 120, started_ago=100, lease_left=30)
    failed = await published_row(db, 120, OutboxState.FAILED)
    completed = await published_row(db, 120, OutboxState.COMPLETED)
    before = await states(db)

    changed = await judge(relay_settings, QueueObservation(empty=True, held=frozenset({held})))(db)

    assert {(r.id, r.state, r.evidence) for r in changed} == {
        (gone, OutboxState.PENDING, Evidence.QUEUE_EMPTY),
        (exhausted, OutboxState.DEAD, Evidence.QUEUE_EMPTY),
    }
    rows = await states(db)
    assert (rows[gone]["republishes"], rows[gone]["attempts"]) == (1, 0)
    assert rows[gone]["last_error"] == "re-published: queue empty"
    assert (rows[exhausted]["state"], rows[exhausted]["republishes"]) == (OutboxState.DEAD, 2)
    assert rows[exhausted]["last_error"] == "message gone after 2 re-publishes: queue empty"
    for untouched in (recent, held, running, failed, completed):
        assert rows[untouched] == before[untouched]
    assert await judge(relay_settings, QueueObservation(empty=True, held=frozenset({held})))(db) == []


async def test_a_started_delivery_is_republished_only_once_its_lease_ran_out(
    relay_settings: Settings, db: asyncpg.Connection
) -> None:
    alive = await published_row(db, 300, started_ago=290, lease_left=60)
    dead = await published_row(db, 300, started_ago=290, lease_left=-200)

    changed = await judge(relay_settings, BUSY)(db)

    assert [(r.id, r.evidence) for r in changed] == [(dead, Evidence.LEASE_RAN_OUT)]
    rows = await states(db)
    assert rows[alive]["state"] == OutboxState.PUBLISHED
    row = await db.fetchrow("SELECT state, delivery_started_at, delivery_lease_until FROM outbox WHERE id = $1", dead)
    assert row is not None
    assert (row["state"], row["delivery_started_at"], row["delivery_lease_until"]) == (OutboxState.PENDING, None, None)


async def test_the_queue_moving_past_a_row_that_never_started_shows_it_is_gone(
    relay_settings: Settings, db: asyncpg.Connection
) -> None:
    margin = order_margin(relay_settings)
    skipped = await published_row(db, 600)
    just_before = await published_row(db, 300 + margin / 2)  # within the margin: could still be in flight
    await published_row(db, 300, OutboxState.COMPLETED)  # a worker finished a message published later

    changed = await judge(relay_settings, BUSY)(db)

    assert [(r.id, r.evidence) for r in changed] == [(skipped, Evidence.QUEUE_PASSED)]
    assert (await states(db))[just_before]["state"] == OutboxState.PUBLISHED


async def test_a_row_whose_task_recorded_its_effect_is_completed_not_republished(
    relay_settings: Settings, db: asyncpg.Connection
) -> None:
    row_id = await published_row(db, 120)
    await queries.record_run_done(db, str(row_id), "audit_log_transaction", {"ok": True})

    changed = await judge(relay_settings, EMPTY)(db)

    assert [(r.id, r.state, r.evidence) for r in changed] == [(row_id, OutboxState.COMPLETED, Evidence.EFFECT_RECORDED)]
    assert (await states(db))[row_id]["republishes"] == 0


async def test_reconcile_observes_the_queue_and_republishes_what_it_lost(
    relay_settings: Settings, db: asyncpg.Connection, publisher: Publisher, broker: PrivateRedis
) -> None:
    settings = relay_settings.model_copy(update={"relay_completion_deadline": 60})
    ids = await insert_rows(db, 3)
    await drain(db, publisher, settings)
    await db.execute("UPDATE outbox SET published_at = now() - interval '1 hour'")
    inspector = create_inspector(settings)
    assert isinstance(inspector, RedisQueueInspector)
    client = broker.client()
    try:
        assert (await reconcile(db, inspector, settings)).republished == 0  # all three still queued
        # A worker takes the first (kombu records it in its unacked hash) and the broker loses the rest.
        first, *_ = queued_messages(client, settings.celery_task_queue)
        client.hset("unacked", "tag-1", json.dumps([first.raw, "", settings.celery_task_queue]))
        client.delete(settings.celery_task_queue)
        result = await reconcile(db, inspector, settings)
    finally:
        client.delete("unacked")
        await inspector.close()
    assert (result.republished, result.dead) == (2, 0)
    rows = await states(db)
    assert rows[uuid.UUID(first.task_id)]["state"] == OutboxState.PUBLISHED
    assert sorted(r["state"] for r in rows.values()) == [
        OutboxState.PENDING,
        OutboxState.PENDING,
        OutboxState.PUBLISHED,
    ]
    assert set(rows) == set(ids)


async def test_replayed_and_reconciled_rows_keep_their_task_id(
    relay_settings: Settings, db: asyncpg.Connection, publisher: Publisher, broker: PrivateRedis
) -> None:
    (row_id,) = await insert_rows(db, 1)
    await drain(db, publisher, relay_settings)
    await db.execute("UPDATE outbox SET published_at = now() - interval '1 hour' WHERE id = $1", row_id)
    await judge(relay_settings, EMPTY)(db)
    await drain(db, publisher, relay_settings)
    queued = [m.task_id for m in queued_messages(broker.client(), relay_settings.celery_task_queue)]
    assert queued == [str(row_id), str(row_id)]


def scans_of(plan: str) -> list[dict[str, Any]]:
    """The scan nodes of an `EXPLAIN (ANALYZE, FORMAT JSON)` plan, at any depth."""
    nodes, stack = [], [json.loads(plan)[0]["Plan"]]
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack.extend(node.get("Plans", []))
    return [n for n in nodes if "Scan" in n["Node Type"]]


async def test_the_claim_reads_no_row_waiting_in_backoff(relay_settings: Settings, db: asyncpg.Connection) -> None:
    await db.execute(
        "INSERT INTO outbox (id, task_name, kwargs, next_attempt_at) "
        "SELECT gen_random_uuid(), 'audit_log_transaction', '{}', now() + interval '1 hour' "
        "FROM generate_series(1, 20000)"
    )
    await insert_rows(db, 30)
    await db.execute("ANALYZE outbox")
    async with db.transaction():
        plan = await db.fetchval(
            "EXPLAIN (ANALYZE, FORMAT JSON) SELECT id FROM outbox WHERE state = 'pending' AND next_attempt_at <= now() "
            "ORDER BY next_attempt_at, created_at LIMIT 500 FOR UPDATE SKIP LOCKED"
        )
    scans = scans_of(plan)
    assert [n.get("Index Name") for n in scans] == ["ix_outbox_due"], scans
    # The 20,000 rows in backoff are outside the index range: none is read, none is filtered out.
    assert scans[0]["Actual Rows"] == 30
    assert scans[0].get("Rows Removed by Filter", 0) == 0


async def test_any_due_says_whether_a_claim_could_find_a_row_and_reads_no_row_in_backoff(
    relay_settings: Settings, db: asyncpg.Connection
) -> None:
    await db.execute(
        "INSERT INTO outbox (id, task_name, kwargs, next_attempt_at) "
        "SELECT gen_random_uuid(), 'audit_log_transaction', '{}', now() + interval '1 hour' "
        "FROM generate_series(1, 20000)"
    )
    for state in (OutboxState.PUBLISHED, OutboxState.COMPLETED, OutboxState.DEAD):
        await db.execute("UPDATE outbox SET state = $1 WHERE id = $2", state, (await insert_rows(db, 1))[0])
    await db.execute("ANALYZE outbox")
    assert not await queries.any_due(db)
    assert await claim_pending(db, 10) == []
    scans = scans_of(await db.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + queries._ANY_DUE))
    assert [(n.get("Index Name"), n["Actual Rows"]) for n in scans] == [("ix_outbox_due", 0)], scans

    (due,) = await insert_rows(db, 1)
    assert await queries.any_due(db)
    other = await connect(relay_settings, "test-other-relay")
    try:
        async with other.transaction():
            assert len(await claim_pending(other, 10)) == 1
            # Held by another relay: still due here, so a poll claims and finds nothing (SKIP LOCKED).
            assert await queries.any_due(db)
            async with db.transaction():
                assert await claim_pending(db, 10) == []
            await other.execute("UPDATE outbox SET state = 'published' WHERE id = $1", due)
    finally:
        await other.close()
    assert not await queries.any_due(db)


@contextmanager
def resetting_listener() -> Iterator[tuple[int, list[int]]]:
    """A port whose every connection is accepted and reset at once; yields it and the accept count."""
    accepted = [0]
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(50)

        def serve() -> None:
            while True:
                try:
                    connection, _ = listener.accept()
                except OSError:
                    return
                accepted[0] += 1
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                connection.close()

        threading.Thread(target=serve, daemon=True).start()
        yield listener.getsockname()[1], accepted
        listener.shutdown(socket.SHUT_RDWR)


async def test_send_task_publisher_sends_each_row_once_to_its_queue_and_does_not_retry_a_failing_broker(
    relay_settings: Settings, broker: PrivateRedis
) -> None:
    settings = relay_settings.model_copy(update={"relay_fast_publish": False})
    rows = [queries.OutboxRow(uuid.uuid4(), "audit_log_transaction", {"n": n}, 0) for n in range(3)]
    publisher = create_publisher(settings)
    assert isinstance(publisher, SendTaskPublisher)
    try:
        assert await publisher.publish(rows) == [None, None, None]
    finally:
        await publisher.close()
    messages = queued_messages(broker.client(), settings.celery_task_queue)
    assert [(m.task_id, m.kwargs) for m in messages] == [(str(r.id), r.kwargs) for r in rows]
    assert messages[0].raw["content-type"] == "application/json"
    assert broker.client().llen("celery") == 0  # not Celery's default queue

    # The relay retries each row with backoff and counts the attempt: the publisher itself must
    # not retry (Celery's publish retry would hold the batch and hide the failure).
    with resetting_listener() as (port, accepted):
        failing = create_publisher(
            settings.model_copy(update={"celery_broker_url_override": f"redis://127.0.0.1:{port}/0"})
        )
        try:
            outcomes = await failing.publish(rows)
        finally:
            await failing.close()
    assert all(isinstance(o, Unsent) and o.error.startswith("broker unavailable") for o in outcomes), outcomes
    assert accepted[0] <= len(rows), f"{accepted[0]} connections for {len(rows)} rows: the publisher retried"


async def test_a_send_task_batch_longer_than_its_budget_leaves_the_rest_for_the_next_batch(
    relay_settings: Settings, db: asyncpg.Connection, broker: PrivateRedis
) -> None:
    settings = relay_settings.model_copy(update={"relay_fast_publish": False, "relay_batch_size": 2000})
    slow = SendTaskPublisher(create_celery_app(settings), settings.celery_task_queue, 1.0, batch_budget=0.2)
    await insert_rows(db, 2000)
    try:
        result = await relay_batch(db, slow, settings)
    finally:
        await slow.close()
    assert result.unreachable is None  # a slow batch is not an outage
    assert 0 < result.published < 2000
    rows = await states(db)
    left = [r for r in rows.values() if r["state"] == OutboxState.PENDING]
    assert len(left) == 2000 - result.published
    assert {(r["attempts"], r["last_error"]) for r in left} == {(0, None)}


@pytest.mark.e2e
async def test_the_inspector_sees_the_messages_a_real_worker_holds(
    settings: Settings, engine: AsyncEngine, broker: PrivateRedis
) -> None:
    queue = new_queue()
    held = worker_settings(
        settings.async_database_url,
        broker.url,
        celery_task_queue=queue,
        audit_write_delay=3.0,
        celery_task_time_limit=10,
        celery_task_soft_time_limit=9,
        smtp_timeout=5,
        celery_visibility_timeout=30,
        celery_retry_backoff_max=5,
    )
    audit_id = await insert_outbox_row(engine, "audit_log_transaction", {})
    inspector = create_inspector(held)
    client = create_celery_app(held)
    try:
        with start_worker(worker_env(held), queue=queue):
            client.send_task("audit_log_transaction", kwargs={"transaction_id": "t", "data": {}}, task_id=audit_id)
            started = "SELECT 1 FROM outbox WHERE id = $1 AND delivery_started_at IS NOT NULL"
            await until(lambda: fetch(engine, started, uuid.UUID(audit_id)), 30, "the worker to start the task")
            observed = await inspector.observe()
    finally:
        await inspector.close()
        client.close()
    assert observed == QueueObservation(empty=True, held=frozenset({uuid.UUID(audit_id)}))


@pytest.fixture
def amqp_settings(relay_settings: Settings) -> Iterator[Settings]:
    url = os.environ.get("TEST_AMQP_URL")
    if not url:
        pytest.skip("TEST_AMQP_URL is not set (e.g. amqp://guest:guest@127.0.0.1:5672//)")
    settings = relay_settings.model_copy(update={"celery_broker_url_override": url, "celery_task_queue": new_queue()})
    yield settings
    with create_celery_app(settings).connection_for_write() as connection:
        connection.default_channel.queue_delete(settings.celery_task_queue)


async def test_a_rabbitmq_queue_is_inspected_by_its_ready_message_count(
    amqp_settings: Settings, db: asyncpg.Connection
) -> None:
    inspector = create_inspector(amqp_settings)
    publisher = create_publisher(amqp_settings)
    try:
        assert await inspector.observe() == QueueObservation(empty=None, held=None)  # no such queue yet
        await insert_rows(db, 3)
        assert (await relay_batch(db, publisher, amqp_settings)).published == 3
        assert await publisher.probe() is None
        assert await inspector.observe() == QueueObservation(empty=False, held=None)
        with create_celery_app(amqp_settings).connection_for_write() as connection:
            connection.default_channel.queue_purge(amqp_settings.celery_task_queue)
        assert await inspector.observe() == QueueObservation(empty=True, held=None)
    finally:
        await publisher.close()
        await inspector.close()
