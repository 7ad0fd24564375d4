"""The ASGI application: `uvicorn api.main:app`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from opentelemetry.trace import TracerProvider
from sqlalchemy.ext.asyncio import AsyncEngine

from api.bodylimit import BodyLimit
from api.dependencies import AppState, document_bearer_auth
from api.errors import install_error_handlers
from api.metrics import instrument
from api.ratelimit import RateLimiter
from api.routes import health, router
from api.tracing import TracedFastAPI
from core.clients import Clients
from core.database import create_engine
from core.ledger import Ledger
from core.logging import configure_logging
from core.metrics import start_metrics_server
from core.outbox.notifier import CommitNotifier
from core.settings import Settings, get_settings
from core.telemetry import API_SERVICE, configure_tracing, flush_tracing

logger = logging.getLogger(__name__)

LedgerFactory = Callable[[AsyncEngine, Settings], Ledger]

# How the API's sessions show in pg_stat_activity (the relay's and the worker's name theirs too).
API_APPLICATION_NAME = "outbox-api"
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


def create_app(
    settings: Settings | None = None,
    ledger: LedgerFactory = _ledger,
    tracer_provider: TracerProvider | None = None,
) -> FastAPI:
    """Build the app; the database engine, the metrics server and tracing start in the lifespan, not here.

    `ledger` builds the use cases (the benchmark swaps in its baselines).
    `tracer_provider` None: the process's own, from the OTEL_* variables (tests pass theirs).
    """
    resolved = settings or get_settings()  # the middleware depends on it, so it is read here
    tracer = tracer_provider.get_tracer("api") if tracer_provider is not None else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(resolved, "api")
        provider = tracer_provider or configure_tracing(API_SERVICE)
        if resolved.admin_api_key is None:
            logger.warning("ADMIN_API_KEY is not set: no operator can create clients or deposit through the API")
        # No pre-ping: it cost three round trips per request. The pool still never hands out a
        # connection the driver knows the server closed (core.database), and one that fails
        # its BEGIN fails that one request with 503 and is discarded (DriverUnitOfWork).
        engine = create_engine(
            resolved,
            pool_pre_ping=False,
            connect_args={"server_settings": {"application_name": API_APPLICATION_NAME}},
        )
        clients = Clients(engine, admin_api_key=resolved.admin_key, cache_seconds=resolved.auth_cache_seconds)
        limiter = RateLimiter(resolved.rate_limit, resolved.rate_limit_storage)
        await limiter.check_shared()
        services = AppState(resolved, engine, ledger(engine, resolved), clients, limiter, metrics)
        app.state.services = services
        purging = asyncio.create_task(_purge_expired_keys(services.ledger), name="purge-idempotency-keys")
        metrics_server = None
        if metrics is not None:
            port = resolved.api_metrics_port
            metrics_server = start_metrics_server(metrics.registry, port, variable="API_METRICS_PORT")
        try:
            yield
        finally:
            purging.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await purging
            await engine.dispose()
            if metrics_server:
                metrics_server.close()
            flush_tracing(provider)

    app = TracedFastAPI(
        tracer=tracer,
        title="Outbox transfers",
        description="Money transfers whose side effects are published through a transactional outbox.",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(router)
    document_bearer_auth(app, router.prefix)
    app.include_router(health)
    # API_METRICS_PORT=0: no middleware, no counters (error handlers find app.state.metrics None).
    metrics = instrument(app) if resolved.api_metrics_port else None
    app.state.metrics = metrics
    app.add_middleware(BodyLimit, max_bytes=lambda: resolved.max_request_body_bytes)
    return app


async def _purge_expired_keys(ledger: Ledger) -> None:
    while True:
        await asyncio.sleep(PURGE_INTERVAL)
        try:
            while await ledger.purge_expired_idempotency_keys(PURGE_BATCH) == PURGE_BATCH:
                pass
        except Exception:  # the next round tries again; the keys are merely kept longer
            logger.warning("could not purge expired idempotency keys", exc_info=True)


app = create_app()
