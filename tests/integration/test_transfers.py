"""A transfer commits its money movement and exactly its two outbox rows together."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from datetime import datetime, timedelta
from decimal import Decimal

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from api.main import create_app
from core.clients import Clients
from core.contract import AUDIT_LOG_TRANSACTION, SEND_TRANSACTION_EMAIL
from core.errors import InsufficientFunds
from core.ledger import TransferRequest
from core.settings import Settings
from tests.support.api import OPERATOR_HEADERS, bearer, open_account
from tests.support.database import account_holder, funded_account, make_ledger
from tests.support.environment import ADMIN_KEY
from tests.support.outbox import outbox_rows


async def test_transfer_writes_its_outbox_rows_in_the_same_commit(
    client: httpx.AsyncClient, operator: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    source = await open_account(client, operator, "50.00", email="ann@example.com")
    target = await open_account(client, operator, email="bob@example.com")

    response = await client.post(
        "/api/v1/transactions/transfer", json={"from_account_id": source, "to_account_id": target, "amount": "12.5"}
    )

    assert response.status_code == 201
    transfer = response.json()
    assert transfer["amount"] == "12.50"
    assert transfer["status"] == "SUCCESS"
    assert transfer["kind"] == "transfer"
    assert (await client.get(f"/api/v1/accounts/{source}")).json()["balance"] == "37.50"
    assert (await client.get(f"/api/v1/accounts/{target}")).json()["balance"] == "12.50"
    rows = await outbox_rows(engine, "transaction_id = $1::uuid", transfer["id"])
    assert [row.task_name for row in rows] == [AUDIT_LOG_TRANSACTION, SEND_TRANSACTION_EMAIL]
    audit, email = rows[0].kwargs, rows[1].kwargs
    assert email == {"email": "ann@example.com", "amount": "12.50", "status": "SUCCESS"}
    assert audit["transaction_id"] == transfer["id"]
    assert audit["data"]["amount"] == "12.50"
    assert audit["data"]["from_account_id"] == source
    assert audit["data"]["kind"] == "transfer"
    assert {row.state for row in rows} == {"pending"}

    detail = (await client.get(f"/api/v1/transactions/{transfer['id']}")).json()
    assert sorted(m["task_name"] for m in detail["messages"]) == [AUDIT_LOG_TRANSACTION, SEND_TRANSACTION_EMAIL]
    assert all(m["published_at"] is None and m["attempts"] == 0 for m in detail["messages"])
    assert all("last_error" not in m for m in detail["messages"]), "last_error is for operators only"
    seen_by_operator = (await operator.get(f"/api/v1/transactions/{transfer['id']}")).json()
    assert all("last_error" in m for m in seen_by_operator["messages"])


async def test_a_deposit_is_a_transaction_with_its_own_outbox_rows(
    client: httpx.AsyncClient, operator: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    account = await open_account(client, operator, email="dee@example.com")
    response = await operator.post(
        f"/api/v1/accounts/{account}/deposits", json={"amount": "20"}, headers={"Idempotency-Key": "d-1"}
    )
    assert response.status_code == 201, response.text
    deposit = response.json()
    assert deposit["kind"] == "deposit"
    assert deposit["from_account_id"] is None
    assert deposit["to_account_id"] == account
    assert deposit["amount"] == "20.00"
    rows = await outbox_rows(engine, "transaction_id = $1::uuid", deposit["id"])
    assert [row.task_name for row in rows] == [AUDIT_LOG_TRANSACTION, SEND_TRANSACTION_EMAIL]
    assert rows[1].kwargs == {"email": "dee@example.com", "amount": "20.00", "status": "SUCCESS"}
    assert rows[0].kwargs["data"]["kind"] == "deposit"
    assert rows[0].kwargs["data"]["from_account_id"] is None
    assert (await client.get(f"/api/v1/accounts/{account}")).json()["balance"] == "20.00"
    assert (await client.get(f"/api/v1/transactions/{deposit['id']}")).status_code == 200

    again = await operator.post(
        f"/api/v1/accounts/{account}/deposits", json={"amount": "20"}, headers={"Idempotency-Key": "d-1"}
    )
    assert again.status_code == 201
    assert again.json() == deposit
    assert (await client.get(f"/api/v1/accounts/{account}")).json()["balance"] == "20.00"


async def test_transfer_commits_while_redis_is_unreachable(settings: Settings, engine: AsyncEngine) -> None:
    unreachable = settings.model_copy(
        update={
            "celery_broker_url_override": "redis://127.0.0.1:1/0",
            "celery_result_backend_override": "redis://127.0.0.1:1/0",
        }
    )
    app = create_app(unreachable)
    holder = await Clients(engine, admin_api_key=None, cache_seconds=0).create("holder")
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://test", headers=OPERATOR_HEADERS) as operator,
            httpx.AsyncClient(transport=transport, base_url="http://test", headers=bearer(holder.api_key)) as client,
        ):
            a = await open_account(client, operator, "10")
            b = await open_account(client, operator)
            response = await client.post(
                "/api/v1/transactions/transfer", json={"from_account_id": a, "to_account_id": b, "amount": "3.00"}
            )
            assert response.status_code == 201
            detail = await client.get(f"/api/v1/transactions/{response.json()['id']}")
            assert detail.status_code == 200
            assert {m["state"] for m in detail.json()["messages"]} == {"pending"}


async def test_ready_is_503_when_the_database_is_unreachable(settings: Settings) -> None:
    down = settings.model_copy(update={"database_url": "postgresql://postgres@127.0.0.1:1/nowhere"})
    app = create_app(down)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/health/live")).status_code == 200
            ready = await client.get("/health/ready")
            assert ready.status_code == 503
            assert ready.headers["Retry-After"] == "1"
            error = ready.json()["error"]
            assert error["message"] == "database unavailable", "says what is down, not the exception"
            assert "127.0.0.1" not in ready.text
            assert "nowhere" not in ready.text
            # The operator's key needs no database; what it asks for does.
            read = await client.get(
                f"/api/v1/accounts/{uuid.uuid4()}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
            )
            assert read.status_code == 503
            assert read.headers["Retry-After"]
            # A client's key is looked up in the database: 503 too, not 401.
            unknown = await client.get(f"/api/v1/accounts/{uuid.uuid4()}", headers={"Authorization": "Bearer x" * 2})
            assert unknown.status_code == 503


async def test_concurrent_transfers_both_ways_never_deadlock_and_balance(
    settings: Settings, engine: AsyncEngine
) -> None:
    """Real concurrent transactions between few accounts, in both directions."""
    pooled = create_async_engine(settings.async_database_url, pool_size=16, max_overflow=0)
    service = make_ledger(pooled, settings)
    owner = await account_holder(engine)
    accounts = [await funded_account(service, owner, Decimal("100.00")) for _ in range(4)]
    rng = random.Random(7)
    # The model: the moves the service accepted. Every balance must be what they add up to, so a
    # service that refused everything, or wrote the rows but moved no money, fails.
    moved: list[tuple[uuid.UUID, uuid.UUID, Decimal]] = []

    async def one() -> None:
        source, target = rng.sample(accounts, 2)
        amount = Decimal(rng.randint(1, 3000)) / 100
        try:
            await service.transfer(TransferRequest(source, target, amount), owner)
        except InsufficientFunds:
            pass  # the model does not know the order the commits took; the balances below check it
        else:
            moved.append((source, target, amount))

    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(300))), timeout=120)
    await pooled.dispose()

    assert len(moved) > 100
    expected = dict.fromkeys(accounts, Decimal("100.00"))
    for source, target, amount in moved:
        expected[source] -= amount
        expected[target] += amount
    async with engine.connect() as connection:
        balances = {row.id: row.balance for row in await connection.execute(text("SELECT id, balance FROM accounts"))}
        transactions = (await connection.execute(text("SELECT count(*) FROM transactions"))).scalar_one()
        outbox = (await connection.execute(text("SELECT count(*) FROM outbox"))).scalar_one()
    assert balances == expected
    assert min(balances.values()) >= 0
    assert transactions == len(moved) + 4  # and the four deposits
    assert outbox == 2 * transactions


@pytest.mark.parametrize("key", ["race-key"])
async def test_concurrent_requests_with_one_idempotency_key_make_one_transfer(
    settings: Settings, engine: AsyncEngine, key: str
) -> None:
    pooled = create_async_engine(settings.async_database_url, pool_size=8)
    service = make_ledger(pooled, settings)
    owner = await account_holder(engine)
    a = await funded_account(service, owner, Decimal("5.00"))
    b = await funded_account(service, owner, Decimal("0"))

    results = await asyncio.gather(
        *(service.transfer(TransferRequest(a, b, Decimal("5.00"), key), owner) for _ in range(8))
    )
    await pooled.dispose()

    assert len({r.transaction.id for r in results}) == 1, "every retry answered with the original, none refused"
    assert sum(r.created for r in results) == 1
    async with engine.connect() as connection:
        assert (
            await connection.execute(
                text("SELECT count(*) FROM outbox WHERE transaction_id = :id"), {"id": results[0].transaction.id}
            )
        ).scalar_one() == 2
        balance = (
            await connection.execute(text("SELECT balance FROM accounts WHERE id = :id"), {"id": b})
        ).scalar_one()
    assert balance == Decimal("5.00")


def _no_floats_or_constants(text: str) -> object:
    raise AssertionError(f"a task payload carries the number {text}: money and ids travel as strings")


async def test_outbox_kwargs_are_exactly_the_task_payloads_in_strict_json(
    client: httpx.AsyncClient, operator: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    """What the relay will hand the broker, read as the text PostgreSQL stores: strict JSON (no
    float, no NaN) that is exactly each task's keyword arguments."""
    a = await open_account(client, operator, "10", email="payer@example.com")
    b = await open_account(client, operator)
    response = await client.post(
        "/api/v1/transactions/transfer", json={"from_account_id": a, "to_account_id": b, "amount": "0.01"}
    )
    assert response.status_code == 201, response.text
    transfer = response.json()
    async with engine.connect() as connection:
        rows = (
            await connection.execute(
                text("SELECT task_name, kwargs::text AS raw FROM outbox WHERE transaction_id = :id"),
                {"id": transfer["id"]},
            )
        ).all()
    payloads = {
        row.task_name: json.loads(row.raw, parse_float=_no_floats_or_constants, parse_constant=_no_floats_or_constants)
        for row in rows
    }
    assert len(rows) == 2
    audit_data = payloads[AUDIT_LOG_TRANSACTION]["data"]
    created_at = datetime.fromisoformat(audit_data.pop("created_at"))
    assert created_at.utcoffset() == timedelta(0)
    assert created_at == datetime.fromisoformat(transfer["created_at"])
    assert payloads == {
        SEND_TRANSACTION_EMAIL: {"email": "payer@example.com", "amount": "0.01", "status": "SUCCESS"},
        AUDIT_LOG_TRANSACTION: {
            "transaction_id": transfer["id"],
            "data": {
                "kind": "transfer",
                "transaction_id": transfer["id"],
                "from_account_id": a,
                "to_account_id": b,
                "amount": "0.01",
                "currency": "EUR",
                "status": "SUCCESS",
            },
        },
    }
