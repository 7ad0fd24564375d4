"""The same statement of concurrent tasks, sent to PostgreSQL together: one round trip, one commit.

Every task records its start and its effect in statements of its own, each a round trip through
the loop and a commit in PostgreSQL. Calls of one statement that arrive within a batch's window
(below), or while it waits for a connection, join that batch. asyncpg's fetchmany
sends the batch's Bind and Execute messages before a single Sync, which PostgreSQL runs as one
implicit transaction: every statement sees the ones before it, as separate statements would, and
the batch commits once.

A batch waits a short window (WORKER_BATCH_WINDOW, set per pool with `set_window`) before it takes a
connection, so that calls arriving one after another join it. Without the window, a worker's tasks
arrive one at a time from the broker (one message per read), each statement had a connection to
itself, and batches held one call: draining a backlog, the worker's loop then spent about half as
much CPU again per task as with a 10 ms window, and PostgreSQL committed once per statement. The
window is latency added to each batched statement (two per task), in exchange for fewer round trips
and commits whenever more than one task is in flight.

What a caller sees is what its own statement would have given. A statement's error aborts the
whole batch's transaction, so then every statement of the batch runs again on its own (on
connections of its own, as it would have without batching) and each caller gets its own outcome.
A lost connection fails every caller of the batch, as it fails a statement in flight: the outcome
is unknown, and the tasks' statements are idempotent so that a retry finds out.

Only statements that return exactly one row may be batched (queries.ONE_ROW: the batch's rows are
matched to its callers by position).
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from core.outbox import queries

# Enough to share one round trip among a burst's tasks; a larger batch only holds its first
# statements' locks longer.
MAX_BATCH = 64


class _Batch:
    __slots__ = ("calls", "pool", "query", "timer")

    def __init__(self, pool: asyncpg.Pool, query: str) -> None:
        self.pool, self.query = pool, query
        self.calls: list[tuple[tuple[Any, ...], asyncio.Future[asyncpg.Record]]] = []
        self.timer: asyncio.TimerHandle | None = None  # the window's end, until the batch starts


# The batches still taking calls, by pool and statement. A batch leaves it when it gets its
# connection, and holds its pool until then, so a pool's id cannot be reused meanwhile. Each pool
# is used on its own loop's thread only.
_open: dict[tuple[int, str], _Batch] = {}
_flushes: set[asyncio.Task[None]] = set()  # the loop holds its tasks weakly
# Seconds a new batch waits for more calls, by pool (set_window); none for a pool not named here.
_windows: dict[int, float] = {}


def set_window(pool: asyncpg.Pool, seconds: float) -> None:
    """Make new batches on `pool` wait `seconds` for more calls before they run (0: none). Call
    forget(pool) when the pool closes."""
    if seconds > 0:
        _windows[id(pool)] = seconds
    else:
        forget(pool)


def forget(pool: asyncpg.Pool) -> None:
    """Drop `pool`'s window (its id may be reused by a later object)."""
    _windows.pop(id(pool), None)


class Batched:
    """A pool's `fetchrow` with concurrent calls of one statement batched: pass it where
    core.outbox.queries takes a connection, for the statements of queries.ONE_ROW only."""

    __slots__ = ("_pool",)

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record:
        if query not in queries.ONE_ROW:
            raise ValueError("only the statements of queries.ONE_ROW can be batched")
        return await fetchrow(self._pool, query, *args)


async def fetchrow(pool: asyncpg.Pool, query: str, *args: Any) -> asyncpg.Record:
    """The row `query` returns for `args`, run in a batch with concurrent calls of the same query.

    Raises what the statement alone would raise; a lost connection or a pool that cannot give one
    raises that to every caller of the batch.
    """
    key = (id(pool), query)
    loop = asyncio.get_running_loop()
    batch = _open.get(key)
    if batch is None:
        batch = _open[key] = _Batch(pool, query)
        window = _windows.get(key[0])
        if window:
            batch.timer = loop.call_later(window, _start, key, batch)
        else:
            _start(key, batch)
    future: asyncio.Future[asyncpg.Record] = loop.create_future()
    batch.calls.append((args, future))
    if len(batch.calls) >= MAX_BATCH:
        _close(key, batch)
        if batch.timer is not None:  # full: no need to wait out the window
            batch.timer.cancel()
            _start(key, batch)
    return await future


def _start(key: tuple[int, str], batch: _Batch) -> None:
    """Start running `batch`: it takes calls until it gets a connection."""
    batch.timer = None
    flush = asyncio.get_running_loop().create_task(_flush(key, batch))
    _flushes.add(flush)
    flush.add_done_callback(_flushes.discard)


def _close(key: tuple[int, str], batch: _Batch) -> None:
    """Take no more calls into `batch`: the next call opens a new one."""
    if _open.get(key) is batch:
        del _open[key]


async def _flush(key: tuple[int, str], batch: _Batch) -> None:
    try:
        async with batch.pool.acquire() as connection:
            _close(key, batch)
            alone = await _run(connection, batch)
    except BaseException as error:
        _close(key, batch)
        _fail(batch.calls, error)
        return
    if alone:  # each on its own connection, concurrently, as without batching
        await asyncio.gather(*(_run_alone(batch.pool, batch.query, args, future) for args, future in alone))


async def _run(
    connection: queries.Connection, batch: _Batch
) -> list[tuple[tuple[Any, ...], asyncio.Future[asyncpg.Record]]]:
    """Run the batch's live calls in one round trip and resolve them; returns the calls to run
    again on their own (all of them, after a statement's error aborted the batch)."""
    calls = [(args, future) for args, future in batch.calls if not future.done()]  # callers that gave up
    if not calls:
        return []
    if len(calls) == 1:
        args, future = calls[0]
        await _resolve(connection.fetchrow(batch.query, *args), future)
        return []
    try:
        rows = await connection.fetchmany(batch.query, [args for args, _ in calls])
    except asyncpg.PostgresError:  # one statement failed, and with it the batch's transaction
        return calls
    if len(rows) != len(calls):  # committed, but rows cannot be matched to callers: a caller's bug
        _fail(calls, RuntimeError(f"a batched statement returned {len(rows)} rows for {len(calls)} calls"))
        return []
    for (_, future), row in zip(calls, rows, strict=True):
        if not future.done():
            future.set_result(row)
    return []


async def _run_alone(pool: asyncpg.Pool, query: str, args: tuple[Any, ...], future: asyncio.Future[Any]) -> None:
    if future.done():
        return
    try:
        async with pool.acquire() as connection:
            await _resolve(connection.fetchrow(query, *args), future)
    except BaseException as error:
        _fail([(args, future)], error)


async def _resolve(statement: Any, future: asyncio.Future[Any]) -> None:
    """Await `statement` and hand its row or its error to `future` (unless its caller gave up)."""
    try:
        row = await statement
    except asyncpg.PostgresError as error:
        if not future.done():
            future.set_exception(error)
        return
    if not future.done():
        future.set_result(row)


def _fail(calls: list[tuple[tuple[Any, ...], asyncio.Future[Any]]], error: BaseException) -> None:
    for _, future in calls:
        if future.done():
            continue
        if isinstance(error, asyncio.CancelledError):
            future.cancel()
        else:
            future.set_exception(error)
