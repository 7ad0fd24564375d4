"""Objects the routes need, built once in the lifespan and handed out per request; and who is calling.

Each /api/v1 route takes one dependency, a `Call`: who is calling (authenticated, counted against
its rate limit, its role checked) and the app's services. One dependency with a plain `Request`
parameter, instead of a chain (state, bearer credentials, caller, role), because FastAPI resolves
every node of a chain on every request: the chain cost a transfer more CPU than the key check and
the role check it carried. The bearer scheme still shows in the OpenAPI document
(`document_bearer_auth`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from sqlalchemy.ext.asyncio import AsyncEngine

from api.metrics import ApiMetrics
from api.ratelimit import RateLimiter
from core.clients import Clients, Principal
from core.errors import Forbidden, Unauthenticated
from core.ledger import Ledger
from core.settings import Settings

BEARER_SCHEME = "HTTPBearer"
_BEARER_DOCUMENTATION = {
    "type": "http",
    "scheme": "bearer",
    "description": "`Authorization: Bearer <key>`: a client's key (from POST /api/v1/clients) or the operator's "
    "ADMIN_API_KEY.",
}


@dataclass(frozen=True)
class AppState:
    settings: Settings
    engine: AsyncEngine
    ledger: Ledger
    clients: Clients
    limiter: RateLimiter
    metrics: ApiMetrics | None = None  # None when API_METRICS_PORT is 0


@dataclass(frozen=True, slots=True)
class Call:
    """One authenticated request: who is calling, and the services to answer it with."""

    caller: Principal
    state: AppState


def services(request: Request) -> AppState:
    state: AppState = request.app.state.services
    return state


async def get_state(request: Request) -> AppState:
    # async: a plain def dependency would cost a thread-pool hop on every request.
    return services(request)


State = Annotated[AppState, Depends(get_state)]


def bearer_key(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` header (the scheme in any case), else None."""
    if not authorization:
        return None
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    if not key or scheme.lower() != "bearer":
        return None
    return key


async def authenticate(request: Request) -> Call:
    """The caller, from its bearer key; counted against its rate limit. Raises Unauthenticated or RateLimited."""
    state = services(request)
    key = bearer_key(request.headers.get("authorization"))
    if key is None:
        raise Unauthenticated("an API key is required: send Authorization: Bearer <key>")
    caller = await state.clients.authenticate(key)
    if caller is None:
        raise Unauthenticated("the API key is not valid (wrong or revoked)")
    await state.limiter.hit(str(caller.id))
    return Call(caller, state)


async def any_caller(request: Request) -> Call:
    return await authenticate(request)


async def client_only(request: Request) -> Call:
    call = await authenticate(request)
    if call.caller.is_operator:
        raise Forbidden("the operator owns no accounts: call this with a client's key")
    return call


async def operator_only(request: Request) -> Call:
    call = await authenticate(request)
    if not call.caller.is_operator:
        raise Forbidden("only the operator may do this")
    return call


Caller = Annotated[Call, Depends(any_caller)]
AccountHolder = Annotated[Call, Depends(client_only)]
Operator = Annotated[Call, Depends(operator_only)]


def document_bearer_auth(app: FastAPI, prefix: str) -> None:
    """List the bearer scheme in `app`'s OpenAPI document, as required by every route under `prefix`."""
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        schema.setdefault("components", {}).setdefault("securitySchemes", {})[BEARER_SCHEME] = _BEARER_DOCUMENTATION
        for path, operations in schema["paths"].items():
            if path.startswith(prefix):
                for operation in operations.values():
                    operation["security"] = [{BEARER_SCHEME: []}]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
