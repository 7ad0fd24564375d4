"""The ASGI application: `uvicorn api.main:app`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from api.dependencies import AppState
from api.errors import install_error_handlers
from api.routes import health, router
from core.database import create_engine, create_session_factory
from core.logging import configure_logging
from core.outbox import CommitNotifier
from core.settings import Settings, get_settings
from core.transfers import TransferService

ServiceFactory = Callable[[AsyncEngine, Settings], TransferService]

# How the API's sessions show in pg_stat_activity (the relay's and the worker's name theirs too).
API_APPLICATION_NAME = "outbox-api"


def _transfer_service(engine: AsyncEngine, settings: Settings) -> TransferService:
    return TransferService(engine, CommitNotifier(settings.outbox_notify_interval))


def create_app(settings: Settings | None = None, transfer_service: ServiceFactory = _transfer_service) -> FastAPI:
    """Build the app; the database engine is created in the lifespan, not here.

    `transfer_service` builds the transfer use case (the benchmark swaps in its baselines).
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
        session_factory = create_session_factory(engine)
        app.state.services = AppState(resolved, engine, session_factory, transfer_service(engine, resolved))
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
