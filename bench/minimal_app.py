"""The yardstick of the transfer endpoint's own cost: a minimal FastAPI + asyncpg app that runs
the transfer's exact SQL (core.ledger's statements) and nothing else.

One pool, one pydantic body model, no authentication, no rate limit, no metrics, no tracing, no
error mapping beyond what a refusal needs. `make bench` serves it beside the real endpoint, in the
same run, so that the ratio shows what the endpoint's guarantees and conveniences cost per request.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from core.contract import TransferFacts, transfer_messages
from core.ledger import LOCK_ACCOUNTS, MOVE_AND_RECORD_WITH_OUTBOX, SUCCESS, transfer_values
from core.outbox import queries as outbox


class Transfer(BaseModel):
    from_account_id: uuid.UUID
    to_account_id: uuid.UUID
    amount: Decimal


def create_minimal_app(database_url: str, pool_size: int) -> FastAPI:
    pools: list[asyncpg.Pool] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pools.append(await asyncpg.create_pool(database_url, min_size=pool_size, max_size=pool_size))
        yield
        await pools[0].close()

    app = FastAPI(lifespan=lifespan)

    @app.post("/api/v1/transactions/transfer", status_code=201)
    async def transfer(body: Transfer) -> dict[str, str]:
        async with pools[0].acquire() as connection, connection.transaction():
            ids = sorted([body.from_account_id, body.to_account_id])
            accounts = {row["id"]: row for row in await connection.fetch(LOCK_ACCOUNTS, ids)}
            source, target = accounts.get(body.from_account_id), accounts.get(body.to_account_id)
            if source is None or target is None or source["balance"] < body.amount:
                raise HTTPException(409)
            facts = TransferFacts(
                uuid.uuid4(),
                source["id"],
                target["id"],
                body.amount,
                source["currency"],
                SUCCESS,
                datetime.now(UTC),
                source["owner_email"],
            )
            messages = transfer_messages(facts)
            values = transfer_values(facts)
            message_ids = [uuid.uuid4() for _ in messages]
            await connection.execute(
                MOVE_AND_RECORD_WITH_OUTBOX, *values, *outbox.message_arguments(message_ids, messages)
            )
        return {"id": str(facts.transaction_id)}

    return app


def from_environment() -> FastAPI:
    return create_minimal_app(os.environ["DATABASE_URL"], int(os.environ.get("DB_POOL_SIZE", "24")))
