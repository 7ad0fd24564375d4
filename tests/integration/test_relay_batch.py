"""The relay's batch, publishers and reconciler, in-process, on real PostgreSQL and a private Redis.

Each test truncates the tables (the `engine` fixture) and uses its own queue on a Redis server
of this module's own, so other test sessions cannot touch the messages checked here.
"""

from __future__ import annotations

import asyncio
import io
import socket
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from core.ledger import Ledger, TransferRequest
from core.outbox import queries
from core.outbox.queries import claim_pending
from core.outbox.states import OutboxState
from core.settings import Settings
from devservers.embedded import free_port
from relay import operator
from relay.batch import BatchResult, relay_batch
from relay.celery_app import create_celery_app
from relay.db import connect
from relay.publisher import Publisher, RedisBatchPublisher, SendTaskPublisher, create_publisher
from relay.reconciler import DEAD_REASON, REPUBLISHED_REASON, reconcile
from tests.conftest import account_holder, funded_account
from tests.relays import PrivateRedis, new_queue, queued_messages

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


async def test_a_poison_row_does_not_block_the_others_dies_after_max_attempts_and_can_be_replayed(
    relay_settings: Settings, db: asyncpg.Connection, publisher: Publisher, broker: PrivateRedis
) -> None:
    poison = uuid.uuid4()
    # kwargs must be a JSON object; an array is a payload no publisher can turn into a task.
    await db.execute(
        INSERT, poison, "audit_log_transaction", [1, 2], await db.fetchval("SELECT now() - interval '1 s'")
    )
    good = await insert_rows(db, 5)

    first = await relay_batch(db, publisher, relay_settings)
    assert (first.claimed, first.published, first.failed) == (6, 5, 1)
    for _ in range(50):
        if (await states(db))[poison]["state"] == OutboxState.DEAD:
            break
        await asyncio.sleep(0.02)
        await relay_batch(db, publisher, relay_settings)

    rows = await states(db)
    assert rows[poison]["state"] == OutboxState.DEAD
    assert rows[poison]["attempts"] == relay_settings.relay_max_attempts
    assert "task keyword arguments must be a mapping" in rows[poison]["last_error"]
    assert all(rows[row_id]["state"] == OutboxState.PUBLISHED for row_id in good)
    queued = [m.task_id for m in queued_messages(broker.client(), relay_settings.celery_task_queue)]
    assert sorted(queued) == sorted(map(str, good))
    assert (await relay_batch(db, publisher, relay_settings)).claimed == 0  # dead rows are not tried again

    assert await operator.replay(db, io.StringIO(), io.StringIO(), [poison], []) == 0
    replayed = (await states(db))[poison]
    assert (replayed["state"], replayed["attempts"]) == (OutboxState.PENDING, 0)


@pytest.mark.parametrize("fast", [True, False], ids=["redis-pipeline", "send_task"])
async def test_broker_down_counts_attempts_publishes_nothing_then_drains(
    relay_settings: Settings, db: asyncpg.Connection, broker: PrivateRedis, fast: bool
) -> None:
    refusing = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    down = relay_settings.model_copy(
        update={"celery_broker_url_override": refusing, "relay_fast_publish": fast, "relay_max_attempts": 10}
    )
    up = relay_settings.model_copy(update={"relay_fast_publish": fast})
    ids = await insert_rows(db, 20)
    failing = create_publisher(down)
    assert isinstance(failing, RedisBatchPublisher if fast else SendTaskPublisher)
    try:
        for _ in range(2):
            result = await relay_batch(db, failing, down)
            assert (result.claimed, result.published, result.failed) == (20, 0, 20)
            await asyncio.sleep(0.05)  # past the (short) backoff
    finally:
        await failing.close()

    rows = await states(db)
    assert {(r["state"], r["attempts"]) for r in rows.values()} == {(OutboxState.PENDING, 2)}
    assert all("broker" in r["last_error"] for r in rows.values())
    assert all(r["published_at"] is None for r in rows.values())
    assert queued_messages(broker.client(), relay_settings.celery_task_queue) == []

    working = create_publisher(up)
    try:
        await asyncio.sleep(0.05)
        await drain(db, working, up)
    finally:
        await working.close()
    rows = await states(db)
    assert {(r["state"], r["attempts"]) for r in rows.values()} == {(OutboxState.PUBLISHED, 3)}
    queued = [m.task_id for m in queued_messages(broker.client(), relay_settings.celery_task_queue)]
    assert sorted(queued) == sorted(map(str, ids))


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
    assert (result.claimed, result.failed) == (3, 3)
    assert {r["state"] for r in (await states(db)).values()} == {OutboxState.PENDING}


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
    db: asyncpg.Connection, age_s: float, state: str = OutboxState.PUBLISHED, republishes: int = 0
) -> uuid.UUID:
    row_id = uuid.uuid4()
    await db.execute(
        "INSERT INTO outbox (id, task_name, kwargs, state, attempts, republishes, published_at, completed_at) "
        "VALUES ($1, 'audit_log_transaction', '{}', $2::text, 1, $3, now() - make_interval(secs => $4), "
        "CASE WHEN $2::text = 'completed' THEN now() END)",
        row_id,
        state,
        republishes,
        age_s,
    )
    return row_id


async def test_reconciler_republishes_overdue_rows_then_marks_them_dead_and_leaves_others(
    relay_settings: Settings, db: asyncpg.Connection
) -> None:
    settings = relay_settings.model_copy(update={"relay_completion_deadline": 60, "relay_max_republishes": 2})
    overdue = await published_row(db, 120)
    exhausted = await published_row(db, 120, republishes=2)
    recent = await published_row(db, 10)
    failed = await published_row(db, 120, OutboxState.FAILED)
    completed = await published_row(db, 120, OutboxState.COMPLETED)
    before = await states(db)

    result = await reconcile(db, settings)

    rows = await states(db)
    assert (result.republished, result.dead) == (1, 1)
    assert (rows[overdue]["state"], rows[overdue]["republishes"], rows[overdue]["attempts"]) == (
        OutboxState.PENDING,
        1,
        0,
    )
    assert rows[overdue]["last_error"] == REPUBLISHED_REASON
    assert (rows[exhausted]["state"], rows[exhausted]["republishes"]) == (OutboxState.DEAD, 2)
    assert rows[exhausted]["last_error"] == DEAD_REASON.format(2)
    for untouched in (recent, failed, completed):
        assert rows[untouched] == before[untouched]
    assert (await reconcile(db, settings)) == type(result)(0, 0)


async def test_replayed_and_reconciled_rows_keep_their_task_id(
    relay_settings: Settings, db: asyncpg.Connection, publisher: Publisher, broker: PrivateRedis
) -> None:
    (row_id,) = await insert_rows(db, 1)
    await drain(db, publisher, relay_settings)
    await db.execute("UPDATE outbox SET published_at = now() - interval '1 hour' WHERE id = $1", row_id)
    await reconcile(db, relay_settings.model_copy(update={"relay_completion_deadline": 60}))
    await drain(db, publisher, relay_settings)
    queued = [m.task_id for m in queued_messages(broker.client(), relay_settings.celery_task_queue)]
    assert queued == [str(row_id), str(row_id)]


async def test_send_task_publisher_matches_the_celery_app_settings(relay_settings: Settings) -> None:
    app = create_celery_app(relay_settings)
    assert app.conf.task_default_queue == relay_settings.celery_task_queue
    assert app.conf.task_serializer == "json"
    assert app.conf.task_publish_retry is False
