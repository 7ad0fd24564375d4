"""A transfer commits its money movement and exactly its two outbox rows together."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from decimal import Decimal

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from api.main import create_app
from core.contract import AUDIT_LOG_TRANSACTION, SEND_TRANSACTION_EMAIL
from core.errors import InsufficientFunds
from core.ledger import TransferRequest
from core.settings import Settings
from tests.conftest import make_ledger


async def test_transfer_writes_its_outbox_rows_in_the_same_commit(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    source = (
        await client.post(
            "/api/v1/accounts", json={"owner_email": "ann@example.com", "currency": "EUR", "initial_balance": "50.00"}
        )
    ).json()
    target = (await client.post("/api/v1/accounts", json={"owner_email": "bob@example.com", "currency": "EUR"})).json()

    response = await client.post(
        "/api/v1/transactions/transfer",
        json={"from_account_id": source["id"], "to_account_id": target["id"], "amount": "12.5"},
    )

    assert response.status_code == 201
    transfer = response.json()
    assert transfer["amount"] == "12.50"
    assert transfer["status"] == "SUCCESS"
    assert (await client.get(f"/api/v1/accounts/{source['id']}")).json()["balance"] == "37.50"
    assert (await client.get(f"/api/v1/accounts/{target['id']}")).json()["balance"] == "12.50"
    async with engine.connect() as connection:
        rows = (
            await connection.execute(
                text("SELECT task_name, kwargs, state FROM outbox WHERE transaction_id = :id ORDER BY task_name"),
                {"id": transfer["id"]},
            )
        ).all()
    assert [row.task_name for row in rows] == [AUDIT_LOG_TRANSACTION, SEND_TRANSACTION_EMAIL]
    audit, email = rows[0].kwargs, rows[1].kwargs
    assert email == {"email": "ann@example.com", "amount": "12.50", "status": "SUCCESS"}
    assert audit["transaction_id"] == transfer["id"]
    assert audit["data"]["amount"] == "12.50"
    assert audit["data"]["from_account_id"] == source["id"]
    assert {row.state for row in rows} == {"pending"}

    detail = (await client.get(f"/api/v1/transactions/{transfer['id']}")).json()
    assert sorted(m["task_name"] for m in detail["messages"]) == [AUDIT_LOG_TRANSACTION, SEND_TRANSACTION_EMAIL]
    assert all(m["published_at"] is None and m["attempts"] == 0 for m in detail["messages"])


async def test_transfer_commits_while_redis_is_unreachable(settings: Settings, engine: AsyncEngine) -> None:
    unreachable = settings.model_copy(
        update={
            "celery_broker_url_override": "redis://127.0.0.1:1/0",
            "celery_result_backend_override": "redis://127.0.0.1:1/0",
        }
    )
    app = create_app(unreachable)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            a = (
                await client.post(
                    "/api/v1/accounts",
                    json={"owner_email": "a@example.com", "currency": "EUR", "initial_balance": "10"},
                )
            ).json()
            b = (await client.post("/api/v1/accounts", json={"owner_email": "b@example.com", "currency": "EUR"})).json()
            response = await client.post(
                "/api/v1/transactions/transfer",
                json={"from_account_id": a["id"], "to_account_id": b["id"], "amount": "3.00"},
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
            assert ready.json()["error"] == {"code": "not_ready", "message": "database unavailable"}
            assert ready.headers["Retry-After"] == "1"
            transfer = await client.post(
                "/api/v1/transactions/transfer",
                json={"from_account_id": str(uuid.uuid4()), "to_account_id": str(uuid.uuid4()), "amount": "1.00"},
            )
            assert transfer.status_code == 503
            assert transfer.headers["Retry-After"] == "1"


async def test_concurrent_transfers_both_ways_never_deadlock_and_balance(
    settings: Settings, engine: AsyncEngine
) -> None:
    """Real concurrent transactions between few accounts, in both directions."""
    pooled = create_async_engine(settings.async_database_url, pool_size=16, max_overflow=0)
    service = make_ledger(pooled, settings)
    accounts = [(await service.open_account(f"u{i}@example.com", "EUR", Decimal("100.00"))).id for i in range(4)]
    rng = random.Random(7)
    outcomes = {"ok": 0, "insufficient": 0}

    async def one() -> None:
        source, target = rng.sample(accounts, 2)
        try:
            await service.transfer(TransferRequest(source, target, Decimal(rng.randint(1, 3000)) / 100))
            outcomes["ok"] += 1
        except InsufficientFunds:
            outcomes["insufficient"] += 1

    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(300))), timeout=120)
    await pooled.dispose()

    assert outcomes["ok"] + outcomes["insufficient"] == 300
    assert outcomes["ok"] > 100
    async with engine.connect() as connection:
        total = (await connection.execute(text("SELECT sum(balance) FROM accounts"))).scalar_one()
        negative = (await connection.execute(text("SELECT count(*) FROM accounts WHERE balance < 0"))).scalar_one()
        transactions = (await connection.execute(text("SELECT count(*) FROM transactions"))).scalar_one()
        outbox = (await connection.execute(text("SELECT count(*) FROM outbox"))).scalar_one()
    assert total == Decimal("400.00")
    assert negative == 0
    assert transactions == outcomes["ok"]
    assert outbox == 2 * outcomes["ok"]


@pytest.mark.parametrize("key", ["race-key"])
async def test_concurrent_requests_with_one_idempotency_key_make_one_transfer(
    settings: Settings, engine: AsyncEngine, key: str
) -> None:
    pooled = create_async_engine(settings.async_database_url, pool_size=8)
    service = make_ledger(pooled, settings)
    a = (await service.open_account("a@example.com", "EUR", Decimal("100"))).id
    b = (await service.open_account("b@example.com", "EUR", Decimal("0"))).id

    results = await asyncio.gather(*(service.transfer(TransferRequest(a, b, Decimal("5.00"), key)) for _ in range(8)))
    await pooled.dispose()

    assert len({r.transaction.id for r in results}) == 1
    assert sum(r.created for r in results) == 1
    async with engine.connect() as connection:
        assert (await connection.execute(text("SELECT count(*) FROM outbox"))).scalar_one() == 2
        balance = (
            await connection.execute(text("SELECT balance FROM accounts WHERE id = :id"), {"id": b})
        ).scalar_one()
    assert balance == Decimal("5.00")


async def test_outbox_kwargs_survive_json(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    a = (
        await client.post(
            "/api/v1/accounts", json={"owner_email": "a@example.com", "currency": "EUR", "initial_balance": "10"}
        )
    ).json()
    b = (await client.post("/api/v1/accounts", json={"owner_email": "b@example.com", "currency": "EUR"})).json()
    await client.post(
        "/api/v1/transactions/transfer", json={"from_account_id": a["id"], "to_account_id": b["id"], "amount": "0.01"}
    )
    async with engine.connect() as connection:
        for (kwargs,) in (await connection.execute(text("SELECT kwargs FROM outbox"))).all():
            assert json.loads(json.dumps(kwargs)) == kwargs
