"""The ASGI application: `uvicorn api.main:app`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.dependencies import AppState
from api.errors import install_error_handlers
from api.routes import health, router
from core.database import create_engine, create_session_factory
from core.logging import configure_logging
from core.outbox import CommitNotifier
from core.settings import Settings, get_settings
from core.transfers import TransferService


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; the database engine is created in the lifespan, not here."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        resolved = settings or get_settings()
        configure_logging(resolved, "api")
        engine = create_engine(resolved)
        session_factory = create_session_factory(engine)
        notifier = CommitNotifier(resolved.outbox_notify_interval)
        app.state.services = AppState(resolved, engine, session_factory, TransferService(session_factory, notifier))
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
