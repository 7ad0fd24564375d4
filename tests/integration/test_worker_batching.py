"""The worker's batches of concurrent statements (worker.batching), on a real PostgreSQL.

Calls started together share one transaction (rows written together share their xmin), and each
caller still gets what its own statement would have given: its own row, its own error, and one
lease among duplicates.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from core.outbox import queries
from core.settings import Settings
from worker import batching, effects
from worker.batching import MAX_BATCH, Batched


@pytest.fixture
async def pool(settings: Settings, db: asyncpg.Connection) -> AsyncIterator[asyncpg.Pool]:
    """A pool like the worker's, with a short lock timeout so a locked row fails fast."""
    made = await asyncpg.create_pool(
        settings.libpq_database_url, min_size=0, max_size=4, server_settings={"lock_timeout": "300"}
    )
    yield made
    await made.close()


async def _published_rows(db: asyncpg.Connection, count: int) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in range(count)]
    await db.executemany(
        "INSERT INTO outbox (id, task_name, kwargs, state, published_at) "
        "VALUES ($1, 'audit_log_transaction', '{}', 'published', now())",
        [(row_id,) for row_id in ids],
    )
    return ids


async def _transactions_of(db: asyncpg.Connection, ids: list[uuid.UUID]) -> int:
    """How many transactions last wrote these outbox rows."""
    count: int = await db.fetchval("SELECT count(DISTINCT xmin::text) FROM outbox WHERE id = ANY($1::uuid[])", ids)
    return count


async def test_concurrent_starts_share_one_transaction(pool: asyncpg.Pool, db: asyncpg.Connection) -> None:
    ids = await _published_rows(db, 20)
    stored = await asyncio.gather(
        *(effects.start_delivery(pool, task_id=str(row_id), lease_seconds=60) for row_id in ids)
    )
    assert stored == [None] * len(ids)  # no task id has a record yet
    started = await db.fetchval(
        "SELECT count(*) FROM outbox WHERE id = ANY($1::uuid[]) AND deliveries = 1 AND delivery_started_at IS NOT NULL",
        ids,
    )
    assert started == len(ids)
    assert await _transactions_of(db, ids) == 1


async def test_a_batch_is_split_at_its_size(pool: asyncpg.Pool, db: asyncpg.Connection) -> None:
    ids = await _published_rows(db, MAX_BATCH + 1)
    await asyncio.gather(*(effects.start_delivery(pool, task_id=str(row_id), lease_seconds=60) for row_id in ids))
    assert await _transactions_of(db, ids) == 2


async def _started_one_by_one(pool: asyncpg.Pool, ids: list[uuid.UUID], pause: float) -> None:
    """Start a delivery for each row, `pause` seconds apart, as a worker's tasks arrive from the broker."""
    calls = []
    for row_id in ids:
        calls.append(asyncio.ensure_future(effects.start_delivery(pool, task_id=str(row_id), lease_seconds=60)))
        await asyncio.sleep(pause)
    await asyncio.gather(*calls)


@pytest.mark.parametrize(("window", "transactions"), [(0.0, 5), (2.0, 1)])
async def test_calls_arriving_one_by_one_join_a_batch_within_its_window(
    pool: asyncpg.Pool, db: asyncpg.Connection, window: float, transactions: int
) -> None:
    ids = await _published_rows(db, 5)
    async with pool.acquire():  # an open connection: a first call's connect cannot outlast the pause
        pass
    batching.set_window(pool, window)
    try:
        await _started_one_by_one(pool, ids, pause=0.1)  # each alone would long be done by the next
    finally:
        batching.forget(pool)
    assert await _transactions_of(db, ids) == transactions


async def test_a_full_batch_does_not_wait_out_its_window(pool: asyncpg.Pool, db: asyncpg.Connection) -> None:
    ids = await _published_rows(db, MAX_BATCH)
    batching.set_window(pool, 600)
    try:
        async with asyncio.timeout(60):  # far less than the window: the full batch ran at once
            await asyncio.gather(
                *(effects.start_delivery(pool, task_id=str(row_id), lease_seconds=60) for row_id in ids)
            )
    finally:
        batching.forget(pool)
    assert await _transactions_of(db, ids) == 1


async def test_a_statements_error_stays_its_callers(pool: asyncpg.Pool, db: asyncpg.Connection) -> None:
    ids = await _published_rows(db, 5)
    locked = ids[2]
    async with db.transaction():  # a relay frozen while it holds one row
        await db.execute("SELECT 1 FROM outbox WHERE id = $1 FOR UPDATE", locked)
        outcomes = await asyncio.gather(
            *(queries.start_delivery(Batched(pool), row_id, str(row_id), 60) for row_id in ids),
            return_exceptions=True,
        )
    assert isinstance(outcomes[2], asyncpg.LockNotAvailableError)
    assert [outcome for i, outcome in enumerate(outcomes) if i != 2] == [None] * 4
    rows = await db.fetch("SELECT id, deliveries FROM outbox WHERE id = ANY($1::uuid[])", ids)
    assert {row["id"]: row["deliveries"] for row in rows} == {row_id: int(row_id != locked) for row_id in ids}


async def test_duplicates_in_one_batch_get_one_lease(pool: asyncpg.Pool, db: asyncpg.Connection) -> None:
    (row_id,) = await _published_rows(db, 1)
    outcomes = await asyncio.gather(
        *(effects.begin_email(pool, task_id=str(row_id), lease_seconds=60) for _ in range(5))
    )
    claims = [claim for done, claim in outcomes if done is None and claim is not None]
    assert len(claims) == 5
    assert sum(claim.owned for claim in claims) == 1
    assert all(claim.retry_in > 0 for claim in claims if not claim.owned)  # they wait for the holder
    assert await db.fetchval("SELECT deliveries FROM outbox WHERE id = $1", row_id) == 5


async def test_duplicate_records_in_one_batch_write_once(pool: asyncpg.Pool, db: asyncpg.Connection) -> None:
    (row_id,) = await _published_rows(db, 1)
    task_id = str(row_id)
    results = await asyncio.gather(
        *(
            effects.write_audit_once(pool, task_id=task_id, transaction_id="t-1", data={"n": i}, result={"by": i})
            for i in range(4)
        )
    )
    assert [result for result, _ in results] == [{"by": 0}] * 4  # the first record's result, for all
    assert all(completed for _, completed in results)
    assert await db.fetchval("SELECT count(*) FROM audit_log WHERE task_id = $1", task_id) == 1
    assert await db.fetchval("SELECT state FROM outbox WHERE id = $1", row_id) == "completed"


async def test_a_caller_that_gave_up_is_left_out(pool: asyncpg.Pool, db: asyncpg.Connection) -> None:
    ids = await _published_rows(db, 3)
    calls = [
        asyncio.ensure_future(effects.start_delivery(pool, task_id=str(row_id), lease_seconds=60)) for row_id in ids
    ]
    await asyncio.sleep(0)  # each has joined the batch, which has not been sent yet
    calls[1].cancel()
    await asyncio.gather(*calls, return_exceptions=True)
    rows = await db.fetch("SELECT id, deliveries FROM outbox WHERE id = ANY($1::uuid[])", ids)
    assert {row["id"]: row["deliveries"] for row in rows} == {ids[0]: 1, ids[1]: 0, ids[2]: 1}


async def test_only_one_row_statements_are_batched(pool: asyncpg.Pool) -> None:
    with pytest.raises(ValueError, match="ONE_ROW"):
        await Batched(pool).fetchrow("SELECT 1 WHERE false")


async def test_every_batched_statement_returns_one_row(db: asyncpg.Connection) -> None:
    """Rows are matched to callers by position: a statement of ONE_ROW gives a row even when the
    task id, or the outbox row, does not exist."""
    missing = uuid.uuid4()
    arguments = {
        queries._START_DELIVERY: (missing, str(missing), 60.0),
        queries._START_AND_CLAIM: (missing, str(missing), 60.0, "send_transaction_email"),
        queries._RECORD_AUDIT: (str(missing), "audit_log_transaction", "{}", "t", "{}", missing),
        queries._FINISH_AND_COMPLETE: (str(missing), uuid.uuid4(), "{}", missing),
    }
    assert set(arguments) == queries.ONE_ROW
    for query, args in arguments.items():
        assert len(await db.fetch(query, *args)) == 1
