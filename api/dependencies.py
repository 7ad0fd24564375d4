"""Objects the routes need, built once in the lifespan and handed out per request; and who is calling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncEngine

from api.metrics import ApiMetrics
from api.ratelimit import RateLimiter
from core.clients import Clients, Principal
from core.errors import Forbidden, Unauthenticated
from core.ledger import Ledger
from core.settings import Settings


@dataclass(frozen=True)
class AppState:
    settings: Settings
    engine: AsyncEngine
    ledger: Ledger
    clients: Clients
    limiter: RateLimiter
    metrics: ApiMetrics | None = None  # None when API_METRICS_PORT is 0


async def get_state(request: Request) -> AppState:
    # async: a plain def dependency would cost a thread-pool hop on every request.
    state: AppState = request.app.state.services
    return state


State = Annotated[AppState, Depends(get_state)]

# auto_error=False: a missing key is ours to answer (401 with WWW-Authenticate), not a 403.
_bearer = HTTPBearer(
    auto_error=False,
    description="`Authorization: Bearer <key>`: a client's key (from POST /api/v1/clients) or the operator's "
    "ADMIN_API_KEY.",
)


async def authenticated(
    state: State, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    """The caller, from its bearer key; counted against its rate limit. Raises Unauthenticated or RateLimited."""
    if credentials is None:
        raise Unauthenticated("an API key is required: send Authorization: Bearer <key>")
    caller = await state.clients.authenticate(credentials.credentials)
    if caller is None:
        raise Unauthenticated("the API key is not valid (wrong or revoked)")
    await state.limiter.hit(str(caller.id))
    return caller


Caller = Annotated[Principal, Depends(authenticated)]


async def client_only(caller: Caller) -> Principal:
    if caller.is_operator:
        raise Forbidden("the operator owns no accounts: call this with a client's key")
    return caller


async def operator_only(caller: Caller) -> Principal:
    if not caller.is_operator:
        raise Forbidden("only the operator may do this")
    return caller


AccountHolder = Annotated[Principal, Depends(client_only)]
Operator = Annotated[Principal, Depends(operator_only)]
