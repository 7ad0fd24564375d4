"""Objects the routes need, built once in the lifespan and handed out per request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncEngine

from api.metrics import ApiMetrics
from core.ledger import Ledger
from core.settings import Settings


@dataclass(frozen=True)
class AppState:
    settings: Settings
    engine: AsyncEngine
    ledger: Ledger
    metrics: ApiMetrics | None = None  # None when API_METRICS_PORT is 0


async def get_state(request: Request) -> AppState:
    # async: a plain def dependency would cost a thread-pool hop on every request.
    state: AppState = request.app.state.services
    return state


State = Annotated[AppState, Depends(get_state)]
