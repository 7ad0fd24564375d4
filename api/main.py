"""The ASGI application: `uvicorn api.main:app`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from api.dependencies import AppState
from api.errors import install_error_handlers
from api.routes import health, router
from core.database import create_engine
from core.ledger import Ledger
from core.logging import configure_logging
from core.outbox.notifier import CommitNotifier
from core.settings import Settings, get_settings

LedgerFactory = Callable[[AsyncEngine, Settings], Ledger]

# How the API's sessions show in pg_stat_activity (the relay's and the worker's name theirs too).
API_APPLICATION_NAME = "outbox-api"


def _ledger(engine: AsyncEngine, settings: Settings) -> Ledger:
    notifier = CommitNotifier(settings.outbox_notify_interval)
    return Ledger(engine, notifier, max_transfer_amount=settings.max_transfer_amount)


def create_app(settings: Settings | None = None, ledger: LedgerFactory = _ledger) -> FastAPI:
    """Build the app; the database engine is created in the lifespan, not here.

    `ledger` builds the use cases (the benchmark swaps in its baselines).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        resolved = settings or get_settings()
        configure_logging(resolved, "api")
        # No pre-ping: it cost three round trips per request. The pool still never hands out a
        # connection the driver knows the server closed (core.database), and one that fails
        # its BEGIN fails that one request with 503 and is discarded (DriverUnitOfWork).
        engine = create_engine(
            resolved,
            pool_pre_ping=False,
            connect_args={"server_settings": {"application_name": API_APPLICATION_NAME}},
        )
        app.state.services = AppState(resolved, engine, ledger(engine, resolved))
        try:
            yield
        finally:
            await engine.dispose()

    app = FastAPI(
        title="Outbox transfers",
        description="Money transfers whose side effects are published through a transactional outbox.",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(health)
    return app


app = create_app()
