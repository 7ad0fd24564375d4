"""The worker's database access and event loop: one asyncio loop and one asyncpg pool per process.

Each worker *process* runs one asyncio event loop in a background thread and one asyncpg pool on
it. A task's work is a coroutine run on that loop: the asyncio pool (worker.pool) hands it over and
is called back when it ends; a task run by another pool (threads, prefork, solo) hands it over and
waits. The loop and pool are created on first use and again after a fork (prefork children must
not share the parent's connections). The statements themselves are core.outbox.queries'; this
module only decides how connections are made and bounded.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg

from core.settings import Settings
from worker import batching

T = TypeVar("T")

# Bounds on every database call, because the threads pool cannot enforce the hard time limit.
CONNECT_TIMEOUT = 5.0  # seconds to open a connection
STATEMENT_TIMEOUT_MS = 10_000  # PostgreSQL cancels a statement after this
# A statement waits at most this long for a row lock. Relays hold outbox rows for the milliseconds
# a batch takes to commit; only a relay frozen mid-batch holds them longer (until
# RELAY_IDLE_TRANSACTION_TIMEOUT ends its session), and no task should wait that out.
LOCK_TIMEOUT_MS = 2_000
CALL_TIMEOUT = 30.0  # a whole call, including waiting for a pooled connection
_IN_FLIGHT_POOLS = frozenset({"threads", "asyncio"})


@dataclass(frozen=True)
class PoolOptions:
    max_size: int
    connect_timeout: float
    command_timeout: float
    server_settings: dict[str, str]


def pool_options(settings: Settings) -> PoolOptions:
    """Pool options: at most WORKER_DB_POOL_SIZE connections per process, fewer if it runs fewer tasks.

    The asyncio and threads pools run CELERY_WORKER_CONCURRENCY tasks in one process, most of them waiting on
    the mail server or the audit system, each holding a connection only for the few milliseconds of
    a statement: a few connections serve hundreds of slots (a task waits for a free one within
    CALL_TIMEOUT). A prefork child or solo worker runs one task at a time. Connections open on
    demand (no minimum), so a worker starts while the database is away, and idle ones close after
    a while (asyncpg's default).
    """
    slots = settings.celery_worker_concurrency if settings.celery_worker_pool in _IN_FLIGHT_POOLS else 1
    return PoolOptions(
        max_size=min(slots, settings.worker_db_pool_size),
        connect_timeout=CONNECT_TIMEOUT,
        command_timeout=STATEMENT_TIMEOUT_MS / 1000 + 1,
        server_settings={
            "statement_timeout": str(STATEMENT_TIMEOUT_MS),
            "lock_timeout": str(LOCK_TIMEOUT_MS),
            "application_name": "outbox-worker",
        },
    )


def _new_loop() -> asyncio.AbstractEventLoop:
    # uvloop when installed (it comes with uvicorn[standard]): every database call of every task
    # crosses into this loop, and uvloop's scheduling and thread-safe wake-ups cost far less CPU.
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def _keep_session(connection: asyncpg.Connection) -> None:
    """The pool's reset of a released connection, beyond asyncpg's own (which always rolls back an
    open transaction and drops listeners): nothing. The default also sends `SELECT
    pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`, a round trip per database call of
    every task, undoing what no task does (advisory locks, cursors, LISTEN, SET)."""


class _LoopThread:
    def __init__(self, blocking_threads: int) -> None:
        self.loop = _new_loop()
        # The loop's executor runs what cannot be awaited (an SMTP conversation, smtplib being
        # blocking): one thread per task slot at most, started only when needed.
        self.loop.set_default_executor(ThreadPoolExecutor(blocking_threads, thread_name_prefix="worker-blocking"))
        self.thread = threading.Thread(target=self.loop.run_forever, name="worker-db-loop", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.loop.close()


class WorkerDatabase:
    """One event loop thread and one connection pool per process, shared by all task threads."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._loop: _LoopThread | None = None
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()
        self._running: set[asyncio.Task[Any]] = set()

    def run(self, operation: Callable[[asyncpg.Pool], Awaitable[T]], *, timeout: float | None = CALL_TIMEOUT) -> T:
        """Run `operation(pool)` on the process's loop and return its result.

        Raises what the operation raises, or TimeoutError after `timeout` seconds (the
        operation is then cancelled; None: no bound). Safe to call from any number of threads
        at once, but never from the loop itself (it would wait for itself).
        """
        future = self.submit(operation)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def submit(self, operation: Callable[[asyncpg.Pool], Awaitable[T]]) -> Future[T]:
        """Start `operation(pool)` on the process's loop; its future holds its result or error.

        The coroutine runs in a copy of the caller's context (contextvars: the current span)."""
        loop = self._ensure_started()
        return asyncio.run_coroutine_threadsafe(self._call(operation), loop.loop)

    def start(self, operation: Callable[[asyncpg.Pool], Awaitable[T]], done: Callable[[asyncio.Task[T]], None]) -> None:
        """Start `operation(pool)` on the process's loop; `done` is called on the loop with its
        finished task (result or error), and must not block.

        For the asyncio pool: one wake-up of the loop per task, where submit() also chains a
        future back to the caller's thread. The coroutine runs in a copy of the caller's context."""
        loop = self._ensure_started().loop

        def begin() -> None:
            task = loop.create_task(self._call(operation))
            self._running.add(task)  # the loop holds its tasks weakly
            task.add_done_callback(self._running.discard)
            task.add_done_callback(done)

        loop.call_soon_threadsafe(begin)

    async def _call(self, operation: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
        return await operation(await self._started_pool())

    def close(self) -> None:
        """Close the pool's connections and stop the loop thread (idempotent)."""
        with self._lock:
            loop, pool = self._loop, self._pool
            self._loop = self._pool = None
            owned = self._pid == os.getpid()
            self._pid = None
        if loop is None or not owned:
            return
        if pool is not None:
            asyncio.run_coroutine_threadsafe(pool.close(), loop.loop).result(CALL_TIMEOUT)
            batching.forget(pool)
        loop.stop()

    def _ensure_started(self) -> _LoopThread:
        with self._lock:
            if self._pid != os.getpid() or self._loop is None:
                # After a fork the parent's loop thread does not exist here and its connections
                # belong to the parent: start afresh, leaving the parent's objects untouched.
                self._loop = _LoopThread(self._settings.celery_worker_concurrency)
                self._pool = None
                self._pool_lock = asyncio.Lock()
                self._pid = os.getpid()
            return self._loop

    async def _started_pool(self) -> asyncpg.Pool:
        async with self._pool_lock:  # concurrent first calls must not create two pools
            if self._pool is not None:
                return self._pool
            options = pool_options(self._settings)
            self._pool = await asyncpg.create_pool(
                self._settings.libpq_database_url,
                min_size=0,
                max_size=options.max_size,
                timeout=options.connect_timeout,
                command_timeout=options.command_timeout,
                server_settings=options.server_settings,
                reset=_keep_session,
            )
            batching.set_window(self._pool, self._settings.worker_batch_window)
            return self._pool
