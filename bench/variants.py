"""The baselines the service is measured against, served by the very same app.

`uvicorn bench.variants:app` serves the variant named by BENCH_VARIANT. All run the real API
(routes, validation, the transfer's SQL); only one thing differs each time:
- ``outbox``: the service itself (authenticated, rate-limited, its two outbox rows in the
  transfer's transaction).
- ``plain``: the same transfer with no side effect at all.
- ``naive``: the same transfer, then Celery ``.delay()`` for both tasks inside the request,
  right after commit: what the outbox replaces.
- ``noauth``: the service without authentication: every request is taken to come from the
  bench's client (BENCH_CLIENT_ID), with no key lookup and no rate limit. ``outbox`` against it
  is what authentication costs.
- ``unobserved``: the service itself (authenticated) without metrics or tracing: bench/api_cost.py
  runs it with API_METRICS_PORT=0 and OTEL_SDK_DISABLED=true. ``outbox`` against it is what metrics
  and tracing cost the API.
- ``minimal``: not the API at all, but bench/minimal_app.py: the transfer's exact SQL behind a
  bare FastAPI + asyncpg app. ``outbox`` against it is what the endpoint costs per request.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from celery import Celery
from fastapi import FastAPI, Request
from sqlalchemy.ext.asyncio import AsyncEngine

from api.dependencies import Call, any_caller, client_only, services
from api.main import create_app
from bench.minimal_app import from_environment
from core.clients import Principal, Role
from core.contract import TASK_NAMES, transfer_messages
from core.ledger import Ledger, TransferRequest, TransferResult
from core.settings import Settings


class NaiveLedger(Ledger):
    """Commits the transfer, then publishes its tasks with .delay() before answering."""

    def __init__(self, engine: AsyncEngine, settings: Settings) -> None:
        super().__init__(engine, notifier=None, max_transfer_amount=settings.max_transfer_amount, side_effects=None)
        celery = Celery(broker=settings.celery_broker_url)
        celery.conf.update(
            task_serializer="json", task_default_queue=os.environ.get("BENCH_NAIVE_QUEUE", "bench-naive")
        )

        def declared(**kwargs: Any) -> None:
            """Only the name matters: this process publishes, a worker would execute."""

        self._tasks = {name: celery.task(name=name)(declared) for name in TASK_NAMES}

    async def transfer(self, request: TransferRequest, caller: Principal) -> TransferResult:
        result = await super().transfer(request, caller)
        if result.facts is not None:
            for message in transfer_messages(result.facts):
                self._tasks[message.task_name].delay(**message.kwargs)  # blocking, as the naive design does
        return result


def _plain(engine: AsyncEngine, settings: Settings) -> Ledger:
    return Ledger(engine, notifier=None, max_transfer_amount=settings.max_transfer_amount, side_effects=None)


def _without_authentication() -> FastAPI:
    app = create_app()
    caller = Principal(Role.CLIENT, uuid.UUID(os.environ["BENCH_CLIENT_ID"]), "bench")

    async def the_bench_client(request: Request) -> Call:
        return Call(caller, services(request))

    app.dependency_overrides[any_caller] = the_bench_client
    app.dependency_overrides[client_only] = the_bench_client
    return app


def create_variant(variant: str) -> FastAPI:
    if variant == "minimal":
        return from_environment()
    if variant in ("outbox", "unobserved"):  # the same app; the environment turns observation off
        return create_app()
    if variant == "noauth":
        return _without_authentication()
    if variant == "plain":
        return create_app(ledger=_plain)
    if variant == "naive":
        return create_app(ledger=NaiveLedger)
    raise ValueError(f"BENCH_VARIANT must be outbox, plain, naive, noauth, unobserved or minimal, not {variant!r}")


app = create_variant(os.environ.get("BENCH_VARIANT", "outbox"))
