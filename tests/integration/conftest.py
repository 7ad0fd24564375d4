from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import asyncpg
import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from api.main import create_app
from core.settings import Settings
from relay.db import connect
from tests.support.api import OPERATOR_HEADERS, bearer, new_client_key
from tests.support.relays import PrivateRedis, private_redis

HttpFactory = Callable[..., Awaitable[httpx.AsyncClient]]


@pytest.fixture
async def transport(settings: Settings, engine: AsyncEngine) -> AsyncIterator[httpx.ASGITransport]:
    """The real app (with its lifespan) against the test database, for HTTP clients to share."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield httpx.ASGITransport(app=app, raise_app_exceptions=False)


@pytest.fixture
async def http(transport: httpx.ASGITransport) -> AsyncIterator[HttpFactory]:
    """Makes HTTP clients on the app: `await http(headers)`; all closed at the end."""
    made: list[httpx.AsyncClient] = []

    async def make(headers: dict[str, str] | None = None) -> httpx.AsyncClient:
        made.append(httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers))
        return made[-1]

    yield make
    for client in made:
        await client.aclose()


@pytest.fixture
async def anonymous(http: HttpFactory) -> httpx.AsyncClient:
    """An HTTP client that sends no key."""
    return await http()


@pytest.fixture
async def operator(http: HttpFactory) -> httpx.AsyncClient:
    """An HTTP client with the operator's key (ADMIN_API_KEY)."""
    return await http(OPERATOR_HEADERS)


@pytest.fixture
async def new_client(http: HttpFactory, operator: httpx.AsyncClient) -> Callable[[str], Awaitable[httpx.AsyncClient]]:
    """Makes a new client (through the operator) and returns an HTTP client with its key."""

    async def make(name: str = "client") -> httpx.AsyncClient:
        _, key = await new_client_key(operator, name)
        return await http(bearer(key))

    return make


@pytest.fixture
async def client(new_client: Callable[[str], Awaitable[httpx.AsyncClient]]) -> httpx.AsyncClient:
    """An HTTP client with a new client's key."""
    return await new_client("client")


@pytest.fixture(scope="module")
def broker() -> Iterator[PrivateRedis]:
    """A redis-server of the module's own, which its tests may stop and restart."""
    with private_redis() as server:
        yield server


@pytest.fixture
async def db(settings: Settings, engine: AsyncEngine) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the (truncated) test database with the relay's session settings, which
    also decodes jsonb, for reading rows back."""
    connection = await connect(settings, "test-db")
    await connection.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    yield connection
    await connection.close()
