"""The API's coalesced NOTIFY (README, "Waking up: coalesced NOTIFY plus adaptive polling").

The notifier lives in the API process (api.main builds one CommitNotifier per app from
OUTBOX_NOTIFY_INTERVAL) and the ledger drives it inside each transfer's transaction. So these
tests run the real app, send transfers through HTTP from several concurrent clients, and count
what a LISTEN connection of their own receives on the relay's channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from uuid import UUID

import asyncpg
import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from api.main import create_app
from core.clients import OPERATOR
from core.contract import OUTBOX_CHANNEL
from core.ledger import DepositRequest
from core.settings import Settings
from relay.db import connect
from tests.support.api import OPERATOR_HEADERS, bearer, new_client_key
from tests.support.database import make_ledger

CALLERS = 8
TRANSFERS_EACH = 5
SENTINEL = "test-sentinel"
# An API client, its funded account and the account it pays into.
Caller = tuple[httpx.AsyncClient, str, str]


class Listener:
    """A LISTEN on the outbox channel: every notification's payload, in delivery order."""

    def __init__(self, connection: asyncpg.Connection) -> None:
        self.connection = connection
        self.payloads: list[str] = []

    def on_notify(self, _connection: object, _pid: int, _channel: str, payload: object) -> None:
        self.payloads.append(str(payload))

    async def drained(self, db: asyncpg.Connection, within: float = 30.0) -> list[str]:
        """The notifications committed since the last call, and only those.

        PostgreSQL delivers notifications in commit order, so once a sentinel sent now has
        arrived, so has every notification committed before it.
        """
        await db.execute("SELECT pg_notify($1, $2)", OUTBOX_CHANNEL, SENTINEL)
        deadline = time.monotonic() + within
        while SENTINEL not in self.payloads:
            if time.monotonic() > deadline:
                raise AssertionError(f"the sentinel NOTIFY did not reach the listener within {within}s")
            await asyncio.sleep(0.02)
        end = self.payloads.index(SENTINEL)
        before, self.payloads = self.payloads[:end], self.payloads[end + 1 :]
        return before


@pytest.fixture
async def listener(settings: Settings, engine: AsyncEngine) -> AsyncIterator[Listener]:
    connection = await connect(settings, "test-listen")
    listening = Listener(connection)
    await connection.add_listener(OUTBOX_CHANNEL, listening.on_notify)
    yield listening
    await connection.close()


@asynccontextmanager
async def api_callers(
    settings: Settings, engine: AsyncEngine, transport: httpx.ASGITransport
) -> AsyncIterator[list[Caller]]:
    """CALLERS clients of the app, each with a funded account and a second one to pay into.

    Funded by the test's own ledger, not the app's deposit route: a deposit also goes through the
    app's notifier, and would use up its interval before the burst starts.
    """
    funding = make_ledger(engine, settings)
    async with contextlib.AsyncExitStack() as stack:
        operator = await stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url="http://test", headers=OPERATOR_HEADERS)
        )
        callers = []
        for n in range(CALLERS):
            _, key = await new_client_key(operator, f"caller-{n}")
            client = await stack.enter_async_context(
                httpx.AsyncClient(transport=transport, base_url="http://test", headers=bearer(key))
            )
            accounts = []
            for email in ("payer@example.com", "payee@example.com"):
                answer = await client.post("/api/v1/accounts", json={"owner_email": email, "currency": "EUR"})
                assert answer.status_code == 201, answer.text
                accounts.append(answer.json()["id"])
            await funding.deposit(DepositRequest(UUID(accounts[0]), Decimal("100.00"), f"fund-{n}"), OPERATOR)
            callers.append((client, accounts[0], accounts[1]))
        yield callers


async def burst(callers: list[Caller], amount: str = "1.00") -> list[int]:
    """Every caller sends TRANSFERS_EACH transfers one after another, all callers at once."""

    async def one_caller(client: httpx.AsyncClient, source: str, target: str) -> list[int]:
        statuses = []
        for _ in range(TRANSFERS_EACH):
            answer = await client.post(
                "/api/v1/transactions/transfer",
                json={"from_account_id": source, "to_account_id": target, "amount": amount},
            )
            statuses.append(answer.status_code)
        return statuses

    per_caller = await asyncio.gather(*(one_caller(*caller) for caller in callers))
    return [status for statuses in per_caller for status in statuses]


async def app_transport(settings: Settings, interval: float) -> AsyncIterator[httpx.ASGITransport]:
    app = create_app(settings.model_copy(update={"outbox_notify_interval": interval}))
    async with app.router.lifespan_context(app):
        yield httpx.ASGITransport(app=app, raise_app_exceptions=False)


@pytest.fixture
async def coalescing_app(settings: Settings, engine: AsyncEngine) -> AsyncIterator[httpx.ASGITransport]:
    async for transport in app_transport(settings, interval=5.0):
        yield transport


@pytest.fixture
async def notify_each_app(settings: Settings, engine: AsyncEngine) -> AsyncIterator[httpx.ASGITransport]:
    async for transport in app_transport(settings, interval=0.0):
        yield transport


async def test_a_burst_of_concurrent_transfers_sends_at_most_one_notify_per_interval(
    settings: Settings,
    engine: AsyncEngine,
    coalescing_app: httpx.ASGITransport,
    listener: Listener,
    db: asyncpg.Connection,
) -> None:
    interval = 5.0
    async with api_callers(settings, engine, coalescing_app) as callers:
        await listener.drained(db)  # the funding's own notifications
        started = time.monotonic()
        statuses = await burst(callers)
        elapsed = time.monotonic() - started
    assert statuses == [201] * (CALLERS * TRANSFERS_EACH)
    notifications = await listener.drained(db)

    # The first transfer of the burst wakes the relay; the rest, within the interval, do not notify.
    allowed = 1 + int(elapsed // interval)
    assert 1 <= len(notifications) <= allowed, (
        f"{len(notifications)} NOTIFYs for {len(statuses)} transfers in {elapsed:.1f}s "
        f"(OUTBOX_NOTIFY_INTERVAL={interval}s allows {allowed})"
    )


async def test_with_no_interval_each_committed_transfer_notifies_and_a_refused_one_does_not(
    settings: Settings,
    engine: AsyncEngine,
    notify_each_app: httpx.ASGITransport,
    listener: Listener,
    db: asyncpg.Connection,
) -> None:
    async with api_callers(settings, engine, notify_each_app) as callers:
        await listener.drained(db)  # the funding's own notifications
        statuses = await burst(callers)
        refused = await burst(callers, amount="1000.00")  # more than any payer has: rolled back
    assert statuses == [201] * (CALLERS * TRANSFERS_EACH)
    assert refused == [409] * (CALLERS * TRANSFERS_EACH)
    assert await listener.drained(db) == [""] * len(statuses)
