"""Who may call what: every /api/v1 route refuses a missing, wrong or revoked key (401), each role
is held to its routes (403), and a client cannot reach another client's accounts or transactions:
they answer exactly as if they did not exist (404)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from api.main import create_app
from tests.support.api import bearer, new_client_key, open_account

Factory = Callable[[str], Awaitable[httpx.AsyncClient]]


@dataclass(frozen=True)
class World:
    """Two clients, each with a funded account and a transfer out of it."""

    alice: httpx.AsyncClient
    bob: httpx.AsyncClient
    alice_account: str
    bob_account: str
    alice_transfer: str
    bob_id: str


@pytest.fixture
async def world(
    operator: httpx.AsyncClient, http: Callable[..., Awaitable[httpx.AsyncClient]], client: httpx.AsyncClient
) -> World:
    bob_id, bob_key = await new_client_key(operator, "bob")
    bob = await http(bearer(bob_key))
    alice_account = await open_account(client, operator, "50.00")
    alice_other = await open_account(client, operator)
    bob_account = await open_account(bob, operator, "50.00")
    transfer = await client.post(
        "/api/v1/transactions/transfer",
        json={"from_account_id": alice_account, "to_account_id": alice_other, "amount": "1.00"},
    )
    assert transfer.status_code == 201
    return World(client, bob, alice_account, bob_account, transfer.json()["id"], bob_id)


def _requests(world: World) -> dict[str, tuple[str, str, dict[str, Any] | None, dict[str, str]]]:
    """One well-formed request per route: (method, path, body, headers)."""
    key = {"Idempotency-Key": str(uuid.uuid4())}
    return {
        "POST /api/v1/clients": ("POST", "/api/v1/clients", {"name": "x"}, {}),
        "GET /api/v1/clients": ("GET", "/api/v1/clients", None, {}),
        "DELETE /api/v1/clients/{client_id}": ("DELETE", f"/api/v1/clients/{world.bob_id}", None, {}),
        "POST /api/v1/accounts": ("POST", "/api/v1/accounts", {"owner_email": "a@example.com", "currency": "EUR"}, {}),
        "GET /api/v1/accounts/{account_id}": ("GET", f"/api/v1/accounts/{world.alice_account}", None, {}),
        "POST /api/v1/accounts/{account_id}/deposits": (
            "POST",
            f"/api/v1/accounts/{world.alice_account}/deposits",
            {"amount": "1.00"},
            key,
        ),
        "POST /api/v1/transactions/transfer": (
            "POST",
            "/api/v1/transactions/transfer",
            {"from_account_id": world.alice_account, "to_account_id": world.bob_account, "amount": "1.00"},
            key,
        ),
        "GET /api/v1/transactions/{transaction_id}": ("GET", f"/api/v1/transactions/{world.alice_transfer}", None, {}),
    }


def test_the_table_covers_every_api_route() -> None:
    paths = create_app().openapi()["paths"]
    routes = {
        f"{method.upper()} {path}"
        for path, operations in paths.items()
        if path.startswith("/api/")
        for method in operations
    }
    # Built from a placeholder world: only the keys matter here.
    placeholder = World(None, None, "a", "b", "t", "c")  # type: ignore[arg-type]
    assert routes == set(_requests(placeholder))


@pytest.mark.parametrize(
    "credentials",
    [None, "Bearer", "Bearer not-a-key", "Basic dXNlcjpwYXNz", "bearer " + "x" * 43],
    ids=["no header", "no key", "wrong key", "wrong scheme", "wrong key, lower-case scheme"],
)
async def test_every_route_refuses_a_missing_or_wrong_key(
    world: World, anonymous: httpx.AsyncClient, credentials: str | None
) -> None:
    for name, (method, path, body, headers) in _requests(world).items():
        sent = {**headers, **({"Authorization": credentials} if credentials else {})}
        answer = await anonymous.request(method, path, json=body, headers=sent)
        assert answer.status_code == 401, (name, answer.text)
        assert answer.headers["WWW-Authenticate"] == "Bearer", name
        assert answer.json()["error"]["code"] == "unauthenticated"


async def test_a_revoked_key_stops_working_on_every_route(
    world: World, operator: httpx.AsyncClient, http: Callable[..., Awaitable[httpx.AsyncClient]]
) -> None:
    carol_id, carol_key = await new_client_key(operator, "carol")
    carol = await http(bearer(carol_key))
    assert (await carol.post("/api/v1/accounts", json={"owner_email": "c@example.com", "currency": "EUR"})).is_success

    revoked = await operator.delete(f"/api/v1/clients/{carol_id}")
    assert revoked.status_code == 200
    assert revoked.json()["revoked_at"] is not None

    for name, (method, path, body, headers) in _requests(world).items():
        answer = await carol.request(method, path, json=body, headers=headers)
        assert answer.status_code == 401, (name, answer.text)
        assert answer.headers["WWW-Authenticate"] == "Bearer"
    listed = {c["id"]: c for c in (await operator.get("/api/v1/clients")).json()}
    assert listed[carol_id]["revoked_at"] is not None
    assert "api_key" not in listed[carol_id]


async def test_a_client_cannot_reach_another_clients_resources(world: World) -> None:
    # Bob's view of Alice's account and transfer: as if they did not exist.
    for path in (f"/api/v1/accounts/{world.alice_account}", f"/api/v1/transactions/{world.alice_transfer}"):
        answer = await world.bob.get(path)
        assert answer.status_code == 404, answer.text
        unknown = await world.bob.get(path.rsplit("/", 1)[0] + f"/{uuid.uuid4()}")
        assert answer.json()["error"]["code"] == unknown.json()["error"]["code"]

    # Bob cannot move Alice's money, to himself or anywhere, and learns nothing about the account.
    stolen = await world.bob.post(
        "/api/v1/transactions/transfer",
        json={"from_account_id": world.alice_account, "to_account_id": world.bob_account, "amount": "1.00"},
    )
    assert stolen.status_code == 404
    assert stolen.json()["error"]["code"] == "account_not_found"
    assert (await world.alice.get(f"/api/v1/accounts/{world.alice_account}")).json()["balance"] == "49.00"


async def test_a_client_may_pay_into_anyones_account_and_both_see_that_transfer(world: World) -> None:
    paid = await world.alice.post(
        "/api/v1/transactions/transfer",
        json={"from_account_id": world.alice_account, "to_account_id": world.bob_account, "amount": "2.00"},
    )
    assert paid.status_code == 201
    for http in (world.alice, world.bob):
        assert (await http.get(f"/api/v1/transactions/{paid.json()['id']}")).status_code == 200
    assert (await world.bob.get(f"/api/v1/accounts/{world.bob_account}")).json()["balance"] == "52.00"


async def test_clients_get_403_on_the_operators_routes(world: World) -> None:
    requests = _requests(world)
    for name in (
        "POST /api/v1/clients",
        "GET /api/v1/clients",
        "DELETE /api/v1/clients/{client_id}",
        "POST /api/v1/accounts/{account_id}/deposits",
    ):
        method, path, body, headers = requests[name]
        answer = await world.alice.request(method, path, json=body, headers=headers)
        assert answer.status_code == 403, (name, answer.text)
        assert answer.json()["error"]["code"] == "forbidden"
    assert (await world.alice.get(f"/api/v1/accounts/{world.alice_account}")).json()["balance"] == "49.00"


async def test_the_operator_reads_everything_but_owns_no_account(world: World, operator: httpx.AsyncClient) -> None:
    requests = _requests(world)
    for name in ("POST /api/v1/accounts", "POST /api/v1/transactions/transfer"):
        method, path, body, headers = requests[name]
        answer = await operator.request(method, path, json=body, headers=headers)
        assert answer.status_code == 403, (name, answer.text)
    assert (await operator.get(f"/api/v1/accounts/{world.bob_account}")).status_code == 200
    assert (await operator.get(f"/api/v1/transactions/{world.alice_transfer}")).status_code == 200
    assert (await operator.delete(f"/api/v1/clients/{uuid.uuid4()}")).status_code == 404


async def test_a_new_key_is_shown_once_and_is_long_and_random(operator: httpx.AsyncClient) -> None:
    first = (await operator.post("/api/v1/clients", json={"name": "one"})).json()
    second = (await operator.post("/api/v1/clients", json={"name": "one"})).json()
    assert len(first["api_key"]) >= 43  # 32 random bytes, URL-safe base64
    assert first["api_key"] != second["api_key"]
    assert all("api_key" not in c for c in (await operator.get("/api/v1/clients")).json())
