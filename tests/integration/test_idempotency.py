"""Idempotency keys: scoped per client, expiring, claimed first so that a racing retry waits for its
original and answers with it, never with a refusal."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta

import asyncpg
import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from api.main import create_app
from core.settings import Settings
from tests.support.api import OPERATOR_HEADERS, bearer, new_client_key, open_account
from tests.support.waiting import until

TRANSFER = "/api/v1/transactions/transfer"


async def _balance(client: httpx.AsyncClient, account: str) -> str:
    balance: str = (await client.get(f"/api/v1/accounts/{account}")).json()["balance"]
    return balance


async def _waiting_for_locks(db: asyncpg.Connection, at_least: int) -> None:
    """Until `at_least` of the API's sessions wait on a lock (bounded)."""

    async def waiting() -> bool:
        # `db` holds a transaction open, and pg_stat_activity is a snapshot per transaction.
        await db.execute("SELECT pg_stat_clear_snapshot()")
        count: int = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )
        return count >= at_least

    await until(waiting, 10, f"{at_least} requests waiting on a lock")


@pytest.fixture
async def patient(settings: Settings, engine: AsyncEngine) -> AsyncIterator[httpx.ASGITransport]:
    """The app with a lock timeout long enough for a test to hold a lock on purpose."""
    app = create_app(settings.model_copy(update={"db_lock_timeout": 20.0, "db_statement_timeout": 30.0}))
    async with app.router.lifespan_context(app):
        yield httpx.ASGITransport(app=app)


async def test_a_retry_racing_its_original_waits_and_answers_with_it(
    patient: httpx.ASGITransport, db: asyncpg.Connection
) -> None:
    async with (
        httpx.AsyncClient(transport=patient, base_url="http://test", headers=OPERATOR_HEADERS) as operator,
    ):
        _, key = await new_client_key(operator)
        async with httpx.AsyncClient(transport=patient, base_url="http://test", headers=bearer(key)) as client:
            # Exactly enough for one transfer: a retry that ran on its own would be refused (409).
            source = await open_account(client, operator, "10.00")
            target = await open_account(client, operator)
            body = {"from_account_id": source, "to_account_id": target, "amount": "10.00"}
            headers = {"Idempotency-Key": "pay-rent"}

            # Hold the source account's lock, so the original stops right after claiming its key.
            holder = db.transaction()
            await holder.start()
            await db.execute("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE", source)
            original = asyncio.create_task(client.post(TRANSFER, json=body, headers=headers))
            await _waiting_for_locks(db, 1)
            retry = asyncio.create_task(client.post(TRANSFER, json=body, headers=headers))
            await _waiting_for_locks(db, 2)  # the retry waits on the original's key
            await holder.rollback()
            first, second = await asyncio.gather(original, retry)

            assert first.status_code == 201, first.text
            assert second.status_code == 201, second.text
            assert second.json() == first.json()
            assert await _balance(client, source) == "0.00"
            assert await _balance(client, target) == "10.00"


async def test_two_clients_may_use_the_same_key(
    new_client: Callable[[str], Awaitable[httpx.AsyncClient]], operator: httpx.AsyncClient
) -> None:
    alice, bob = await new_client("alice"), await new_client("bob")
    answers = []
    for client in (alice, bob):
        source, target = await open_account(client, operator, "5.00"), await open_account(client, operator)
        answers.append(
            await client.post(
                TRANSFER,
                json={"from_account_id": source, "to_account_id": target, "amount": "5.00"},
                headers={"Idempotency-Key": "order-42"},
            )
        )
        assert answers[-1].status_code == 201, answers[-1].text
        assert await _balance(client, target) == "5.00"
    assert answers[0].json()["id"] != answers[1].json()["id"]


async def test_a_replay_returns_the_original_status_and_body_and_a_different_body_conflicts(
    client: httpx.AsyncClient, operator: httpx.AsyncClient
) -> None:
    source, target = await open_account(client, operator, "100.00"), await open_account(client, operator)
    body = {"from_account_id": source, "to_account_id": target, "amount": "10"}
    first = await client.post(TRANSFER, json=body, headers={"Idempotency-Key": "k"})
    again = await client.post(TRANSFER, json={**body, "amount": "10.00"}, headers={"Idempotency-Key": "k"})
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json() == first.json()
    other = await client.post(TRANSFER, json={**body, "amount": "11.00"}, headers={"Idempotency-Key": "k"})
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_conflict"
    assert await _balance(client, source) == "90.00"


async def test_a_refused_request_leaves_its_key_unused(client: httpx.AsyncClient, operator: httpx.AsyncClient) -> None:
    source, target = await open_account(client, operator), await open_account(client, operator)
    body = {"from_account_id": source, "to_account_id": target, "amount": "3.00"}
    refused = await client.post(TRANSFER, json=body, headers={"Idempotency-Key": "later"})
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "insufficient_funds"
    await operator.post(
        f"/api/v1/accounts/{source}/deposits", json={"amount": "3.00"}, headers={"Idempotency-Key": "top-up"}
    )
    accepted = await client.post(TRANSFER, json=body, headers={"Idempotency-Key": "later"})
    assert accepted.status_code == 201


async def test_an_expired_key_is_a_new_key(
    client: httpx.AsyncClient, operator: httpx.AsyncClient, engine: AsyncEngine, settings: Settings
) -> None:
    source, target = await open_account(client, operator, "100.00"), await open_account(client, operator)
    body = {"from_account_id": source, "to_account_id": target, "amount": "1.00"}
    first = await client.post(TRANSFER, json=body, headers={"Idempotency-Key": "monthly"})
    async with engine.begin() as connection:
        kept = (
            await connection.execute(text("SELECT expires_at - created_at FROM idempotency_keys WHERE key = 'monthly'"))
        ).scalar_one()
        assert kept == settings.idempotency_key_retention == timedelta(hours=24)
        # A day later (the clock moved, not the test).
        await connection.execute(text("UPDATE idempotency_keys SET expires_at = now() - interval '1 second'"))

    same = await client.post(TRANSFER, json=body, headers={"Idempotency-Key": "monthly"})
    assert same.status_code == 201
    assert same.json()["id"] != first.json()["id"], "months later, the same request moves money again"
    async with engine.begin() as connection:
        await connection.execute(text("UPDATE idempotency_keys SET expires_at = now() - interval '1 second'"))
    different = await client.post(TRANSFER, json={**body, "amount": "2.00"}, headers={"Idempotency-Key": "monthly"})
    assert different.status_code == 201, "an expired key conflicts with nothing"
    assert await _balance(client, source) == "96.00"

    transport = operator._transport
    assert isinstance(transport, httpx.ASGITransport)
    ledger = transport.app.state.services.ledger  # type: ignore[attr-defined]
    async with engine.begin() as connection:
        await connection.execute(text("UPDATE idempotency_keys SET expires_at = now() - interval '1 second'"))
    assert await ledger.purge_expired_idempotency_keys() >= 1
    async with engine.connect() as connection:
        assert (await connection.execute(text("SELECT count(*) FROM idempotency_keys"))).scalar_one() == 0
