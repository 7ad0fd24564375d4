"""Reading the service's state straight from PostgreSQL and Redis, the way an operator would."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import redis


def fetch(database_url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        connection = await asyncpg.connect(database_url)
        try:
            return await connection.fetch(sql, *args)
        finally:
            await connection.close()

    return asyncio.run(run())


def outbox_states(database_url: str) -> dict[str, int]:
    return {r["state"]: r["n"] for r in fetch(database_url, "SELECT state, count(*) AS n FROM outbox GROUP BY state")}


def all_completed(database_url: str) -> bool:
    states = outbox_states(database_url)
    return bool(states) and set(states) == {"completed"}


def task_result(redis_url: str, task_id: str) -> dict[str, Any] | None:
    client = redis.Redis.from_url(redis_url)
    try:
        raw = client.get(f"celery-task-meta-{task_id}")
    finally:
        client.close()
    return json.loads(raw) if raw else None
