"""Every bad input gets a clear 4xx with a JSON body naming the problem, and writes nothing."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.api import open_account

TRANSFER = "/api/v1/transactions/transfer"


async def _counts(engine: AsyncEngine) -> tuple[int, int, str]:
    async with engine.connect() as connection:
        transactions = (await connection.execute(text("SELECT count(*) FROM transactions"))).scalar_one()
        outbox = (await connection.execute(text("SELECT count(*) FROM outbox"))).scalar_one()
        total = (await connection.execute(text("SELECT coalesce(sum(balance), 0)::text FROM accounts"))).scalar_one()
    return transactions, outbox, total


@pytest.fixture
async def pair(client: httpx.AsyncClient, operator: httpx.AsyncClient) -> tuple[str, str]:
    return await open_account(client, operator, "100.00"), await open_account(client, operator)


CASES: list[tuple[str, Any, int, str]] = [
    # (name, body template, status, substring the message must contain)
    ("zero amount", {"amount": "0"}, 422, "greater than 0"),
    ("zero with cents", {"amount": "0.00"}, 422, "greater than 0"),
    ("negative amount", {"amount": "-5.00"}, 422, "decimal string"),
    ("three decimals", {"amount": "1.005"}, 422, "at most 2 decimal places"),
    ("three decimals, trailing zero", {"amount": "1.230"}, 422, "at most 2 decimal places"),
    ("many decimals that would round", {"amount": "12.34999999999999999999999999999999"}, 422, "decimal"),
    ("underscores", {"amount": "1_000"}, 422, "decimal string"),
    ("arabic-indic digits", {"amount": "١٢"}, 422, "decimal string"),
    ("fullwidth digits", {"amount": "１２"}, 422, "decimal string"),
    ("exponent", {"amount": "1e3"}, 422, "decimal string"),
    ("exponent with point", {"amount": "1.5E2"}, 422, "decimal string"),
    ("leading space", {"amount": " 12.00"}, 422, "decimal string"),
    ("plus sign", {"amount": "+12.00"}, 422, "decimal string"),
    ("empty", {"amount": ""}, 422, "decimal string"),
    ("lone point", {"amount": "."}, 422, "decimal string"),
    ("above maximum", {"amount": "1000000.01"}, 422, "must not exceed"),
    ("far above maximum", {"amount": "9999999999999999.99"}, 422, "must not exceed"),
    ("too many digits", {"amount": "12345678901234567"}, 422, "decimal string"),
    ("not a number", {"amount": "ten"}, 422, "decimal string"),
    ("float amount", {"amount": 12.5}, 422, "not a JSON number"),
    ("integer amount", {"amount": 12}, 422, "not a JSON number"),
    ("null amount", {"amount": None}, 422, "not a JSON null"),
    ("infinite amount", {"amount": "Infinity"}, 422, "decimal string"),
    ("nan amount", {"amount": "NaN"}, 422, "decimal string"),
    ("missing amount", {"amount": ...}, 422, "amount"),
    ("malformed from uuid", {"from_account_id": "not-a-uuid"}, 422, "from_account_id"),
    ("malformed to uuid", {"to_account_id": "123"}, 422, "to_account_id"),
    ("missing from", {"from_account_id": ...}, 422, "from_account_id"),
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
        if value is ...:
            body.pop(key)
        else:
            body[key] = value
    before = await _counts(engine)

    response = await client.post(TRANSFER, json=body)

    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle.lower() in error["message"].lower()
    assert isinstance(error["details"], list)
    assert await _counts(engine) == before


@pytest.mark.parametrize(
    "amount", ["12.34999999999999999999999999999999", "1_000", "١٢", "1e3", "1.234", 1.5, -1, "-1", "0", "1000000.01"]
)
async def test_bad_deposit_amount_is_422_and_writes_nothing(
    operator: httpx.AsyncClient, engine: AsyncEngine, pair: tuple[str, str], amount: Any
) -> None:
    before = await _counts(engine)
    response = await operator.post(
        f"/api/v1/accounts/{pair[1]}/deposits", json={"amount": amount}, headers={"Idempotency-Key": "d"}
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "validation_error"
    assert await _counts(engine) == before


async def test_the_largest_amount_moves_exactly(
    client: httpx.AsyncClient, operator: httpx.AsyncClient, pair: tuple[str, str]
) -> None:
    rich = await open_account(client, operator, "1000000.00")
    response = await client.post(
        TRANSFER, json={"from_account_id": rich, "to_account_id": pair[1], "amount": "1000000"}
    )
    assert response.status_code == 201, response.text
    assert response.json()["amount"] == "1000000.00"
    response = await client.post(TRANSFER, json={"from_account_id": pair[0], "to_account_id": rich, "amount": "0.1"})
    assert response.json()["amount"] == "0.10"


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
        assert response.json()["error"]["details"] == []
    assert await _counts(engine) == before


async def test_same_account_is_422(client: httpx.AsyncClient, engine: AsyncEngine, pair: tuple[str, str]) -> None:
    before = await _counts(engine)
    response = await client.post(
        TRANSFER, json={"from_account_id": pair[0], "to_account_id": pair[0], "amount": "1.00"}
    )
    assert response.status_code == 422
    assert "must differ" in response.json()["error"]["message"]
    assert await _counts(engine) == before


async def test_currency_mismatch_is_422(
    client: httpx.AsyncClient, operator: httpx.AsyncClient, engine: AsyncEngine, pair: tuple[str, str]
) -> None:
    dollars = await open_account(client, operator, "5.00", currency="USD")
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
        ({"owner_email": "a@example.com", "currency": "EUR", "initial_balance": "100"}, "initial_balance"),
        ({"currency": "EUR"}, "owner_email"),
    ],
)
async def test_bad_account_is_422(client: httpx.AsyncClient, body: dict[str, Any], needle: str) -> None:
    response = await client.post("/api/v1/accounts", json=body)
    assert response.status_code == 422
    assert needle in response.json()["error"]["message"]


async def test_an_account_opens_at_zero(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/v1/accounts", json={"owner_email": "a@example.com", "currency": "EUR"})
    assert response.status_code == 201
    assert response.json()["balance"] == "0.00"


async def test_unknown_and_malformed_ids_on_reads(client: httpx.AsyncClient) -> None:
    assert (await client.get(f"/api/v1/accounts/{uuid.uuid4()}")).status_code == 404
    assert (await client.get(f"/api/v1/transactions/{uuid.uuid4()}")).status_code == 404
    assert (await client.get("/api/v1/accounts/xyz")).status_code == 422
    assert (await client.get("/api/v1/transactions/xyz")).status_code == 422


@pytest.mark.parametrize("key", ["", "with space", "tab\tkey", "é", "x" * 256])
async def test_a_malformed_idempotency_key_is_422(client: httpx.AsyncClient, pair: tuple[str, str], key: str) -> None:
    body = {"from_account_id": pair[0], "to_account_id": pair[1], "amount": "1.00"}
    response = await client.post(TRANSFER, json=body, headers={b"Idempotency-Key": key.encode()})
    assert response.status_code == 422, response.text


async def test_a_deposit_needs_an_idempotency_key(operator: httpx.AsyncClient, pair: tuple[str, str]) -> None:
    response = await operator.post(f"/api/v1/accounts/{pair[1]}/deposits", json={"amount": "1.00"})
    assert response.status_code == 422
    assert "idempotency-key" in response.json()["error"]["message"].lower()


async def test_a_deposit_past_the_largest_balance_is_409(operator: httpx.AsyncClient, pair: tuple[str, str]) -> None:
    async def top_up() -> httpx.Response:
        return await operator.post(
            f"/api/v1/accounts/{pair[1]}/deposits", json={"amount": "1000000.00"}, headers={"Idempotency-Key": "x"}
        )

    # Not 10^10 requests: put the balance near NUMERIC(18, 2)'s limit directly.
    assert (await top_up()).status_code == 201
    transport = operator._transport
    assert isinstance(transport, httpx.ASGITransport)
    engine = transport.app.state.services.engine  # type: ignore[attr-defined]
    async with engine.begin() as connection:
        await connection.execute(
            text("UPDATE accounts SET balance = 9999999999999999.00 WHERE id = :id"), {"id": pair[1]}
        )
    response = await operator.post(
        f"/api/v1/accounts/{pair[1]}/deposits", json={"amount": "1.00"}, headers={"Idempotency-Key": "y"}
    )
    assert response.status_code == 409, response.text
    assert response.json()["error"]["code"] == "balance_limit_exceeded"


async def test_a_body_over_the_limit_is_413(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    before = await _counts(engine)
    padding = "x" * 70_000
    declared = await client.post(TRANSFER, content=b'{"memo": "' + padding.encode() + b'"}')
    assert declared.status_code == 413
    assert declared.json()["error"] == {
        "code": "payload_too_large",
        "message": "the request body must not exceed 65536 bytes",
        "details": [],
    }

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit is counted while reading
        for _ in range(20):
            yield b"x" * 4096

    streamed = await client.post(TRANSFER, content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413
    assert await _counts(engine) == before


async def test_health_needs_no_key(anonymous: httpx.AsyncClient) -> None:
    assert (await anonymous.get("/health/live")).json() == {"status": "ok"}
    assert (await anonymous.get("/health/ready")).json() == {"status": "ok"}
