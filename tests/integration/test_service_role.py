"""The service runs as a role that is no superuser: a member of outbox_app, which migration 0003
grants exactly what the API, the relay and the worker need, and nothing that changes the schema."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from sqlalchemy import make_url

from api.main import create_app
from core.outbox import queries
from core.settings import Settings
from tests.support.api import OPERATOR_HEADERS, bearer, new_client_key, open_account


@pytest.fixture
async def service_url(settings: Settings, db: asyncpg.Connection) -> AsyncIterator[str]:
    """The test database's URL for a new login role in outbox_app (dropped afterwards)."""
    role = f"svc_{uuid.uuid4().hex[:10]}"
    await db.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE IN ROLE outbox_app")
    try:
        url = make_url(settings.async_database_url).set(username=role, password=None)
        yield url.render_as_string(hide_password=False)
    finally:
        await db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND usename = $1",
            role,
        )
        await db.execute(f"DROP ROLE {role}")


async def test_the_api_and_the_relay_work_as_the_service_role_which_cannot_change_the_schema(
    settings: Settings, service_url: str
) -> None:
    app = create_app(settings.model_copy(update={"database_url": service_url}))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=OPERATOR_HEADERS) as operator:
            _, key = await new_client_key(operator)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=bearer(key)) as client:
                source, target = await open_account(client, operator, "10.00"), await open_account(client, operator)
                body = {"from_account_id": source, "to_account_id": target, "amount": "4.00"}
                moved = await client.post("/api/v1/transactions/transfer", json=body, headers={"Idempotency-Key": "k"})
                assert moved.status_code == 201, moved.text
                assert (await client.get(f"/api/v1/transactions/{moved.json()['id']}")).status_code == 200
        assert await app.state.services.ledger.purge_expired_idempotency_keys() == 0

    connection = await asyncpg.connect(service_url.replace("+asyncpg", ""))
    try:
        assert await connection.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user") is False
        async with connection.transaction():  # the relay's claim and mark
            claimed = await queries.claim_pending(connection, 100)
            assert len(claimed) == 4  # the deposit's two rows and the transfer's two
            await queries.mark_published(connection, [row.id for row in claimed])
        for statement in ("DROP TABLE accounts", "TRUNCATE outbox", "ALTER TABLE accounts ADD COLUMN x int"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await connection.execute(statement)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await connection.execute("UPDATE alembic_version SET version_num = 'x'")
    finally:
        await connection.close()
