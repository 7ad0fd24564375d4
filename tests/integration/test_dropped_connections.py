"""The API's pool never hands out a connection the database has dropped, and says 503 (with
Retry-After) only for requests that could not be served: the in-process app against the test
database, whose own connections (and only those) are terminated."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from api.main import API_APPLICATION_NAME, create_app
from core.database import create_engine
from core.settings import Settings
from core.unit_of_work import ConnectionUnusable, DriverUnitOfWork
from tests.support.api import OPERATOR_HEADERS, bearer, new_client_key
from tests.support.waiting import until

TRANSFER = "/api/v1/transactions/transfer"
# The API's own sessions in this test's database: never another test's, nor another client's.
_API_SESSIONS = """
SELECT pid FROM pg_stat_activity
WHERE datname = current_database() AND application_name = $1 AND pid <> pg_backend_pid()
"""


@pytest.fixture
async def app(settings: Settings, engine: AsyncEngine) -> AsyncIterator[FastAPI]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client with a new client's key."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=OPERATOR_HEADERS) as http:
        _, key = await new_client_key(http)
        http.headers.update(bearer(key))
        yield http


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(settings.libpq_database_url)
    yield connection
    await connection.close()


@pytest.fixture
async def accounts(client: httpx.AsyncClient) -> tuple[str, str]:
    ids = []
    for name in ("from", "to"):
        body = {"owner_email": f"{name}@example.com", "currency": "EUR"}
        response = await client.post("/api/v1/accounts", json=body)
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    deposit = await client.post(
        f"/api/v1/accounts/{ids[0]}/deposits",
        json={"amount": "1000.00"},
        headers={**OPERATOR_HEADERS, "Idempotency-Key": "fund"},
    )
    assert deposit.status_code == 201, deposit.text
    return ids[0], ids[1]


async def _transfer(client: httpx.AsyncClient, accounts: tuple[str, str]) -> httpx.Response:
    body = {"from_account_id": accounts[0], "to_account_id": accounts[1], "amount": "0.01"}
    return await client.post(TRANSFER, json=body)


async def _api_pids(db: asyncpg.Connection) -> set[int]:
    return {row["pid"] for row in await db.fetch(_API_SESSIONS, API_APPLICATION_NAME)}


async def _fill_pool(client: httpx.AsyncClient, accounts: tuple[str, str], db: asyncpg.Connection, n: int) -> set[int]:
    """Make the API hold n pooled connections (n concurrent transfers); return their server pids."""
    responses = await asyncio.gather(*(_transfer(client, accounts) for _ in range(n)))
    assert {r.status_code for r in responses} == {201}
    pids = await _api_pids(db)
    assert len(pids) >= n // 2, pids  # the pool opened several connections
    return pids


async def _terminate(db: asyncpg.Connection, pids: set[int], *, wait: bool) -> None:
    await db.execute("SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", list(pids))
    if wait:
        await until(lambda: _gone(db, pids), 10, f"the terminated sessions {sorted(pids)} gone")


async def _gone(db: asyncpg.Connection, pids: set[int]) -> bool:
    return not await _api_pids(db) & pids


async def test_connections_dropped_while_idle_are_never_handed_out(
    client: httpx.AsyncClient, accounts: tuple[str, str], db: asyncpg.Connection
) -> None:
    dropped = await _fill_pool(client, accounts, db, 10)
    await _terminate(db, dropped, wait=True)

    statuses = [(await _transfer(client, accounts)).status_code for _ in range(3 * len(dropped))]

    assert statuses == [201] * len(statuses)
    assert not await _api_pids(db) & dropped  # every request ran on a new connection
    assert (await client.get("/health/ready")).status_code == 200


async def test_connections_dropped_at_once_fail_at_most_one_request_each(
    client: httpx.AsyncClient, accounts: tuple[str, str], db: asyncpg.Connection
) -> None:
    """No pause between the drop and the requests: a connection whose close the driver has not
    yet read may fail the one request that takes it, and is then discarded, never reused."""
    dropped = await _fill_pool(client, accounts, db, 10)
    await _terminate(db, dropped, wait=False)

    responses = [await _transfer(client, accounts) for _ in range(3 * len(dropped))]

    statuses = [r.status_code for r in responses]
    refused = [i for i, status in enumerate(statuses) if status == 503]
    assert set(statuses) <= {201, 503}, statuses
    assert len(refused) <= len(dropped), statuses
    # The pool hands out its connections in turn: once each was taken, no stale one is left.
    assert all(i < len(dropped) for i in refused), statuses
    assert all(responses[i].headers["Retry-After"] for i in refused)
    print(f"dropped={len(dropped)} refused={len(refused)}")


async def test_a_connection_error_at_begin_discards_the_connection(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one failure the pool cannot see: the driver's BEGIN fails on a connection it still
    believes open (a half-dead socket). The unit of work must discard it, not return it."""
    engine = create_engine(settings, pool_size=1, max_overflow=0, pool_pre_ping=False)
    try:
        async with DriverUnitOfWork(engine) as uow:
            first = uow.connection.get_server_pid()
        real_start = asyncpg.transaction.Transaction.start

        async def broken_start(self: Any) -> None:
            monkeypatch.setattr(asyncpg.transaction.Transaction, "start", real_start)
            raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation")

        monkeypatch.setattr(asyncpg.transaction.Transaction, "start", broken_start)
        with pytest.raises(ConnectionUnusable):
            async with DriverUnitOfWork(engine):
                pass

        async with DriverUnitOfWork(engine) as uow:
            assert uow.connection.get_server_pid() != first
    finally:
        await engine.dispose()
