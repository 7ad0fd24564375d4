from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import asyncpg
import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from api.main import create_app
from core.settings import Settings
from relay.db import connect
from tests.relays import PrivateRedis, private_redis


@pytest.fixture
async def client(settings: Settings, engine: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client on the real app (with its lifespan), against the test database."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield http


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
