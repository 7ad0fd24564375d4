"""Talking to the API as its users do: the operator, clients with their keys, accounts with money in them."""

from __future__ import annotations

import uuid

import httpx

from tests.support.environment import ADMIN_KEY


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


OPERATOR_HEADERS = bearer(ADMIN_KEY)


async def new_client_key(operator: httpx.AsyncClient, name: str = "client") -> tuple[str, str]:
    """(client id, API key) of a new client."""
    answer = await operator.post("/api/v1/clients", json={"name": name})
    assert answer.status_code == 201, answer.text
    body = answer.json()
    return body["id"], body["api_key"]


async def open_account(
    client: httpx.AsyncClient,
    operator: httpx.AsyncClient,
    balance: str = "0.00",
    *,
    currency: str = "EUR",
    email: str = "owner@example.com",
) -> str:
    """An account of `client` with `balance` in it, deposited by `operator`."""
    answer = await client.post("/api/v1/accounts", json={"owner_email": email, "currency": currency})
    assert answer.status_code == 201, answer.text
    account_id: str = answer.json()["id"]
    if balance not in ("0", "0.00"):
        deposited = await deposit(operator, account_id, balance)
        assert deposited.status_code == 201, deposited.text
    return account_id


async def deposit(operator: httpx.AsyncClient, account_id: str, amount: str, key: str | None = None) -> httpx.Response:
    return await operator.post(
        f"/api/v1/accounts/{account_id}/deposits",
        json={"amount": amount},
        headers={"Idempotency-Key": key or str(uuid.uuid4())},
    )
