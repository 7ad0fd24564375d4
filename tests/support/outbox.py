"""Outbox rows as the tests write and read them, straight in PostgreSQL."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from tests.support.database import Database, fetch, select


async def insert_outbox_row(
    database: Database, task_name: str, kwargs: dict[str, Any], *, state: str = "published"
) -> str:
    """An outbox row for a task a test sends by hand (published, unless `state` says otherwise);
    returns its id, which is the task id."""
    outbox_id = str(uuid.uuid4())
    await fetch(
        database,
        "INSERT INTO outbox (id, task_name, kwargs, state, published_at) VALUES ($1, $2, $3::jsonb, $4, now())",
        uuid.UUID(outbox_id),
        task_name,
        json.dumps(kwargs),
        state,
    )
    return outbox_id


def _select(where: str) -> str:
    columns = "id::text AS id, task_name, kwargs::text AS kwargs, state, attempts, republishes, last_error"
    return f"SELECT {columns}, completed_at FROM outbox WHERE {where} ORDER BY task_name, id"


@dataclass(frozen=True)
class OutboxRecord:
    """One outbox row as an operator reads it."""

    id: str
    task_name: str
    kwargs: dict[str, Any]
    state: str
    attempts: int
    republishes: int
    last_error: str | None
    completed_at: datetime | None


def _records(rows: list[asyncpg.Record]) -> list[OutboxRecord]:
    return [OutboxRecord(**{**row, "kwargs": json.loads(row["kwargs"])}) for row in rows]


async def outbox_rows(database: Database, where: str = "true", *args: Any) -> list[OutboxRecord]:
    """Outbox rows matching `where` (with $1.. parameters), by task name then id."""
    return _records(await fetch(database, _select(where), *args))


def outbox_rows_now(database: Database, where: str = "true", *args: Any) -> list[OutboxRecord]:
    """outbox_rows() for tests that run no event loop."""
    return _records(select(database, _select(where), *args))


def outbox_states(database: Database) -> dict[str, int]:
    return {r["state"]: r["n"] for r in select(database, "SELECT state, count(*) AS n FROM outbox GROUP BY state")}


def all_completed(database: Database) -> bool:
    states = outbox_states(database)
    return bool(states) and set(states) == {"completed"}
