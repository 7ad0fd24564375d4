"""Every bad input gets a clear 4xx with a JSON body naming the problem, and writes nothing."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

TRANSFER = "/api/v1/transactions/transfer"


async def _account(client: httpx.AsyncClient, balance: str = "100.00", currency: str = "EUR") -> str:
    response = await client.post(
        "/api/v1/accounts", json={"owner_email": "owner@example.com", "currency": currency, "initial_balance": balance}
    )
    assert response.status_code == 201, response.text
    account_id: str = response.json()["id"]
    return account_id


async def _counts(engine: AsyncEngine) -> tuple[int, int, str]:
    async with engine.connect() as connection:
        transactions = (await connection.execute(text("SELECT count(*) FROM transactions"))).scalar_one()
        outbox = (await connection.execute(text("SELECT count(*) FROM outbox"))).scalar_one()
        total = (await connection.execute(text("SELECT coalesce(sum(balance), 0)::text FROM accounts"))).scalar_one()
    return transactions, outbox, total


@pytest.fixture
async def pair(client: httpx.AsyncClient) -> tuple[str, str]:
    return await _account(client), await _account(client, "0.00")


CASES: list[tuple[str, Any, int, str]] = [
    # (name, body template, status, substring the message must contain)
    ("zero amount", {"amount": "0"}, 422, "greater than 0"),
    ("negative amount", {"amount": "-5.00"}, 422, "greater than 0"),
    ("three decimals", {"amount": "1.005"}, 422, "2 decimal places"),
    ("above maximum", {"amount": "1000000.01"}, 422, "must not exceed"),
    ("not a number", {"amount": "ten"}, 422, "not a decimal"),
    ("float amount", {"amount": 12.5}, 422, "decimal string"),
    ("infinite amount", {"amount": "Infinity"}, 422, "finite"),
    ("nan amount", {"amount": "NaN"}, 422, "finite"),
    ("missing amount", {"amount": None}, 422, "amount"),
    ("malformed from uuid", {"from_account_id": "not-a-uuid"}, 422, "from_account_id"),
    ("malformed to uuid", {"to_account_id": "123"}, 422, "to_account_id"),
    ("missing from", {"from_account_id": None}, 422, "from_account_id"),
    ("unknown field", {"memo": "hi"}, 422, "memo"),
    ("insufficient funds", {"amount": "100.01"}, 409, "insufficient funds"),
]


@pytest.mark.parametrize(("name", "patch", "status", "needle"), CASES, ids=[c[0] for c in CASES])
async def test_bad_transfer_is_refused_and_writes_nothing(
    client: httpx.AsyncClient,
    engine: AsyncEngine,
    pair: tuple[str, str],
    name: str,
    patch: Any,
    status: int,
    needle: str,
) -> None:
    body: dict[str, Any] = {"from_account_id": pair[0], "to_account_id": pair[1], "amount": "10.00"}
    for key, value in patch.items():
        if value is None:
            body.pop(key)
        else:
            body[key] = value
    before = await _counts(engine)

    response = await client.post(TRANSFER, json=body)

    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle.lower() in error["message"].lower()
    assert await _counts(engine) == before


async def test_unknown_account_is_404(client: httpx.AsyncClient, engine: AsyncEngine, pair: tuple[str, str]) -> None:
    before = await _counts(engine)
    missing = str(uuid.uuid4())
    for body in (
        {"from_account_id": missing, "to_account_id": pair[1], "amount": "1.00"},
        {"from_account_id": pair[0], "to_account_id": missing, "amount": "1.00"},
    ):
        response = await client.post(TRANSFER, json=body)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "account_not_found"
        assert missing in response.json()["error"]["message"]
    assert await _counts(engine) == before


async def test_same_account_is_422(client: httpx.AsyncClient, engine: AsyncEngine, pair: tuple[str, str]) -> None:
    before = await _counts(engine)
    response = await client.post(
        TRANSFER, json={"from_account_id": pair[0], "to_account_id": pair[0], "amount": "1.00"}
    )
    assert response.status_code == 422
    assert "must differ" in response.json()["error"]["message"]
    assert await _counts(engine) == before


async def test_currency_mismatch_is_422(client: httpx.AsyncClient, engine: AsyncEngine, pair: tuple[str, str]) -> None:
    dollars = await _account(client, "5.00", "USD")
    before = await _counts(engine)
    response = await client.post(
        TRANSFER, json={"from_account_id": pair[0], "to_account_id": dollars, "amount": "1.00"}
    )
    assert response.status_code == 422
    assert "currency mismatch" in response.json()["error"]["message"]
    assert await _counts(engine) == before


async def test_malformed_json_is_422(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    before = await _counts(engine)
    response = await client.post(TRANSFER, content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_error"
    assert await _counts(engine) == before


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"owner_email": "nope", "currency": "EUR"}, "owner_email"),
        ({"owner_email": "a@example.com", "currency": "euro"}, "currency"),
        ({"owner_email": "a@example.com", "currency": "EUR", "initial_balance": "-1"}, "negative"),
        ({"owner_email": "a@example.com", "currency": "EUR", "initial_balance": "1.001"}, "2 decimal places"),
        ({"currency": "EUR"}, "owner_email"),
    ],
)
async def test_bad_account_is_422(client: httpx.AsyncClient, body: dict[str, Any], needle: str) -> None:
    response = await client.post("/api/v1/accounts", json=body)
    assert response.status_code == 422
    assert needle in response.json()["error"]["message"]


async def test_unknown_and_malformed_ids_on_reads(client: httpx.AsyncClient) -> None:
    assert (await client.get(f"/api/v1/accounts/{uuid.uuid4()}")).status_code == 404
    assert (await client.get(f"/api/v1/transactions/{uuid.uuid4()}")).status_code == 404
    assert (await client.get("/api/v1/accounts/xyz")).status_code == 422
    assert (await client.get("/api/v1/transactions/xyz")).status_code == 422


async def test_idempotency_key_replays_or_conflicts(
    client: httpx.AsyncClient, engine: AsyncEngine, pair: tuple[str, str]
) -> None:
    body = {"from_account_id": pair[0], "to_account_id": pair[1], "amount": "10.00"}
    headers = {"Idempotency-Key": "key-1"}
    first = await client.post(TRANSFER, json=body, headers=headers)
    assert first.status_code == 201
    after_first = await _counts(engine)

    again = await client.post(TRANSFER, json=body, headers=headers)
    assert again.status_code == 200
    assert again.json() == first.json()
    assert await _counts(engine) == after_first

    other = await client.post(TRANSFER, json={**body, "amount": "11.00"}, headers=headers)
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_conflict"
    assert await _counts(engine) == after_first


async def test_health(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health/live")).json() == {"status": "ok"}
    assert (await client.get("/health/ready")).json() == {"status": "ok"}
