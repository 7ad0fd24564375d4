"""One table from domain error to HTTP status, and one JSON shape for every error."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.metrics import count_refused_transfer
from api.ratelimit import RateLimited
from core.errors import (
    AccountNotFound,
    BalanceLimitExceeded,
    ClientNotFound,
    DomainError,
    Forbidden,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAmount,
    InvalidTransfer,
    TransactionNotFound,
    Unauthenticated,
)
from core.transient import CONNECTION_ERRORS

logger = logging.getLogger(__name__)

# Seconds a client should wait before retrying a 503: a restarted database is back in about
# that long, and the pool replaces the connections the restart broke on their next use.
RETRY_AFTER_SECONDS = 1

STATUS_BY_ERROR: dict[type[DomainError], int] = {
    Unauthenticated: 401,
    Forbidden: 403,
    AccountNotFound: 404,
    TransactionNotFound: 404,
    ClientNotFound: 404,
    InsufficientFunds: 409,
    IdempotencyConflict: 409,
    BalanceLimitExceeded: 409,
    InvalidTransfer: 422,
}

# The database is there but cannot serve this statement now: no pooled connection free in time,
# statement_timeout, lock_timeout. Worth a retry shortly, so 503, not 500.
BUSY_ERRORS: tuple[type[Exception], ...] = (
    PoolTimeout,
    asyncpg.QueryCanceledError,
    asyncpg.LockNotAvailableError,
    asyncpg.DeadlockDetectedError,
)


def error_response(
    status: int,
    code: str,
    message: str,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The one error body: code, message and details (a list, empty when there are none).
    Every 503 says when to try again (`Retry-After`)."""
    body: dict[str, Any] = {"code": code, "message": message, "details": details or []}
    if status == 503:
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS), **(headers or {})}
    return JSONResponse(status_code=status, content={"error": body}, headers=headers)


def _answer(
    request: Request,
    status: int,
    code: str,
    message: str,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The error body, counted as a refused transfer when the request was one."""
    count_refused_transfer(request, status, code)
    return error_response(status, code, message, details, headers)


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DomainError)
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthenticated) else None
    return _answer(request, STATUS_BY_ERROR.get(type(exc), 400), exc.code, exc.message, headers=headers)


async def _rate_limited(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RateLimited)
    headers = {"Retry-After": str(exc.retry_after)}
    return _answer(request, 429, "rate_limited", str(exc), headers=headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = [
        {"field": ".".join(str(part) for part in error["loc"]), "message": error["msg"], "type": error["type"]}
        for error in exc.errors()
    ]
    summary = "; ".join(f"{d['field']}: {d['message']}" for d in details)
    return _answer(request, 422, "validation_error", summary or "invalid request", details)


async def _invalid_amount(request: Request, exc: Exception) -> JSONResponse:
    # The same shape as a schema validation error: to a client both are a bad field.
    assert isinstance(exc, InvalidAmount)
    field = f"body.{exc.field}"
    details = [{"field": field, "message": exc.reason, "type": "value_error"}]
    return _answer(request, 422, "validation_error", f"{field}: {exc.reason}", details)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers) if exc.headers else None
    return _answer(request, exc.status_code, "http_error", str(exc.detail), headers=headers)


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("database unavailable: %s", exc)
    return _answer(request, 503, "database_unavailable", "the database is unreachable; try again shortly")


async def _database_busy(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("database busy: %s: %s", type(exc).__name__, exc)
    return _answer(request, 503, "database_busy", "the database is busy; try again shortly")


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DBAPIError)
    # No statement means the error came while connecting (server down, too many clients).
    if exc.statement is None or exc.connection_invalidated:
        return await _database_unavailable(request, exc)
    return await _unexpected(request, exc)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return _answer(request, 500, "internal_error", "internal error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(InvalidAmount, _invalid_amount)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RateLimited, _rate_limited)
    # The use cases run on asyncpg directly: its connection errors mean the same thing.
    unavailable: tuple[type[Exception], ...] = (OperationalError, InterfaceError, *CONNECTION_ERRORS)
    for error in unavailable:
        app.add_exception_handler(error, _database_unavailable)
    for error in BUSY_ERRORS:
        app.add_exception_handler(error, _database_busy)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(Exception, _unexpected)
