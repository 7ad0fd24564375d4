"""The worker's database access: the project's async engine, driven from sync Celery tasks.

Tasks are plain functions run by the pool's threads. Each worker *process* runs one asyncio
event loop in a background thread and one engine (one connection pool) on it; every task
thread hands its coroutine to that loop and waits. The loop and engine are created on first
use and again after a fork (prefork children must not share the parent's connections).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from core.database import create_engine
from core.settings import Settings

T = TypeVar("T")

# Bounds on every database call, because the threads pool cannot enforce the hard time limit.
CONNECT_TIMEOUT = 5.0  # seconds to open a connection (asyncpg `timeout`)
STATEMENT_TIMEOUT_MS = 10_000  # PostgreSQL cancels a statement after this
CALL_TIMEOUT = 30.0  # a whole call, including waiting for a pooled connection
_IN_FLIGHT_POOLS = frozenset({"threads"})


def engine_options(settings: Settings) -> dict[str, Any]:
    """Engine options sized so that every task slot of one process can hold a connection.

    The threads pool runs CELERY_WORKER_CONCURRENCY tasks in one process, so pool size plus
    overflow covers that; overflow connections close when returned, so an idle worker keeps
    only DB_POOL_SIZE. A prefork child or solo worker runs one task at a time.
    """
    slots = settings.celery_worker_concurrency if settings.celery_worker_pool in _IN_FLIGHT_POOLS else 1
    pool_size = min(settings.db_pool_size, slots)
    return {
        "pool_size": pool_size,
        "max_overflow": max(0, slots - pool_size),
        "pool_timeout": CALL_TIMEOUT,
        "connect_args": {
            "timeout": CONNECT_TIMEOUT,
            "command_timeout": STATEMENT_TIMEOUT_MS / 1000 + 1,
            "server_settings": {"statement_timeout": str(STATEMENT_TIMEOUT_MS), "application_name": "outbox-worker"},
        },
    }


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="worker-db-loop", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.loop.close()


class WorkerDatabase:
    """One event loop thread and one engine per process, shared by all task threads."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._loop: _LoopThread | None = None
        self._engine: AsyncEngine | None = None

    def run(self, operation: Callable[[AsyncEngine], Awaitable[T]], *, timeout: float = CALL_TIMEOUT) -> T:
        """Run `operation(engine)` on the process's loop and return its result.

        Raises what the operation raises, or TimeoutError after `timeout` seconds (the
        operation is then cancelled). Safe to call from any number of threads at once.
        """
        loop, engine = self._ensure_started()

        async def call() -> T:
            return await operation(engine)

        future = asyncio.run_coroutine_threadsafe(call(), loop.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def close(self) -> None:
        """Close the pool's connections and stop the loop thread (idempotent)."""
        with self._lock:
            loop, engine = self._loop, self._engine
            self._loop = self._engine = None
            owned = self._pid == os.getpid()
            self._pid = None
        if loop is None or not owned:
            return
        if engine is not None:
            asyncio.run_coroutine_threadsafe(engine.dispose(), loop.loop).result(CALL_TIMEOUT)
        loop.stop()

    def _ensure_started(self) -> tuple[_LoopThread, AsyncEngine]:
        with self._lock:
            if self._pid != os.getpid() or self._loop is None or self._engine is None:
                # After a fork the parent's loop thread does not exist here and its connections
                # belong to the parent: start afresh, leaving the parent's objects untouched.
                self._loop = _LoopThread()
                self._engine = create_engine(self._settings, **engine_options(self._settings))
                self._pid = os.getpid()
            return self._loop, self._engine
