"""HTTP routes. They validate, call one use case, and shape the answer; they never commit."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Header, Response
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.dependencies import State
from api.errors import error_response
from api.metrics import TRANSFER_ROUTE
from api.schemas import (
    AccountCreate,
    AccountOut,
    ErrorOut,
    MessageOut,
    TransactionDetail,
    TransactionOut,
    TransferCreate,
)
from core.ledger import TransferRequest

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1")
health = APIRouter(prefix="/health", tags=["health"])

_ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorOut} for status in (404, 409, 422, 503)}


@router.post("/accounts", status_code=201, response_model=AccountOut, responses=_ERRORS, tags=["accounts"])
async def create_account(body: AccountCreate, state: State) -> AccountOut:
    account = await state.ledger.open_account(str(body.owner_email), body.currency, body.initial_balance)
    return AccountOut.model_validate(account)


@router.get("/accounts/{account_id}", response_model=AccountOut, responses=_ERRORS, tags=["accounts"])
async def read_account(account_id: UUID, state: State) -> AccountOut:
    return AccountOut.model_validate(await state.ledger.account(account_id))


@router.post(
    "/transactions/transfer",
    name=TRANSFER_ROUTE,
    status_code=201,
    response_model=TransactionOut,
    responses=_ERRORS,
    tags=["transactions"],
)
async def transfer(
    body: TransferCreate,
    state: State,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> TransactionOut:
    request = TransferRequest(body.from_account_id, body.to_account_id, body.amount, idempotency_key)
    result = await state.ledger.transfer(request)
    if state.metrics is not None:
        state.metrics.transfer_answered(created=result.created)
    if not result.created:
        response.status_code = 200
    return TransactionOut.model_validate(result.transaction)


@router.get(
    "/transactions/{transaction_id}", response_model=TransactionDetail, responses=_ERRORS, tags=["transactions"]
)
async def read_transaction(transaction_id: UUID, state: State) -> TransactionDetail:
    view = await state.ledger.transaction(transaction_id)
    return TransactionDetail(
        **TransactionOut.model_validate(view.transaction).model_dump(),
        messages=[MessageOut.model_validate(message) for message in view.messages],
    )


@health.get("/live")
async def live() -> dict[str, str]:
    return {"status": "ok"}


@health.get("/ready", response_model=None, responses={503: {"model": ErrorOut}})
async def ready(state: State) -> dict[str, str] | JSONResponse:
    try:
        async with asyncio.timeout(2):
            async with state.engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
    except Exception as exc:
        # The cause goes to the log, not to whoever can reach the health endpoint.
        logger.warning("not ready: database unavailable: %s: %s", type(exc).__name__, exc)
        return error_response(503, "not_ready", "database unavailable")
    return {"status": "ok"}
