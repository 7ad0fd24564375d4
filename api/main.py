"""The ASGI application: `uvicorn api.main:app`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from api.bodylimit import BodyLimit
from api.dependencies import AppState
from api.errors import install_error_handlers
from api.ratelimit import RateLimiter
from api.routes import health, router
from core.clients import Clients
from core.database import create_engine
from core.ledger import Ledger
from core.logging import configure_logging
from core.outbox.notifier import CommitNotifier
from core.settings import Settings, get_settings

logger = logging.getLogger(__name__)

LedgerFactory = Callable[[AsyncEngine, Settings], Ledger]

# Expired idempotency keys are deleted in the background, a batch at a time.
PURGE_INTERVAL = 600.0
PURGE_BATCH = 1_000


def _ledger(engine: AsyncEngine, settings: Settings) -> Ledger:
    notifier = CommitNotifier(settings.outbox_notify_interval)
    return Ledger(
        engine,
        notifier,
        max_transfer_amount=settings.max_transfer_amount,
        idempotency_retention=settings.idempotency_key_retention,
    )


def create_app(settings: Settings | None = None, ledger: LedgerFactory = _ledger) -> FastAPI:
    """Build the app; the database engine is created in the lifespan, not here.

    `ledger` builds the use cases (the benchmark swaps in its baselines).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        resolved = settings or get_settings()
        configure_logging(resolved, "api")
        if resolved.admin_api_key is None:
            logger.warning("ADMIN_API_KEY is not set: no operator can create clients or deposit through the API")
        # No pre-ping: it cost three round trips per request. A connection broken by a database
        # restart fails one request with 503 and is discarded (see DriverUnitOfWork).
        engine = create_engine(resolved, pool_pre_ping=False)
        clients = Clients(engine, admin_api_key=resolved.admin_key, cache_seconds=resolved.auth_cache_seconds)
        limiter = RateLimiter(resolved.rate_limit, resolved.rate_limit_storage)
        await limiter.check_shared()
        services = AppState(resolved, engine, ledger(engine, resolved), clients, limiter)
        app.state.services = services
        purging = asyncio.create_task(_purge_expired_keys(services.ledger), name="purge-idempotency-keys")
        try:
            yield
        finally:
            purging.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await purging
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
    app.add_middleware(BodyLimit, max_bytes=lambda: _body_limit(app))
    return app


def _body_limit(app: FastAPI) -> int:
    services: AppState | None = getattr(app.state, "services", None)
    if services is None:
        return int(Settings.model_fields["max_request_body_bytes"].default)
    return services.settings.max_request_body_bytes


async def _purge_expired_keys(ledger: Ledger) -> None:
    while True:
        await asyncio.sleep(PURGE_INTERVAL)
        try:
            while await ledger.purge_expired_idempotency_keys(PURGE_BATCH) == PURGE_BATCH:
                pass
        except Exception:  # the next round tries again; the keys are merely kept longer
            logger.warning("could not purge expired idempotency keys", exc_info=True)


app = create_app()
