"""The two baselines the outbox API is measured against, served like the real one.

`uvicorn bench.variants:app` serves the variant named by BENCH_VARIANT:
- ``outbox``: the service itself (api.main).
- ``plain``: the same transfer with no side effect at all.
- ``naive``: the same transfer, then Celery ``.delay()`` for both tasks inside the request,
  right after commit: what the outbox replaces.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from celery import Celery
from fastapi import FastAPI

from api.errors import install_error_handlers
from api.main import create_app
from api.schemas import TransactionOut, TransferCreate
from core.contract import transfer_messages
from core.database import create_engine, create_session_factory
from core.settings import get_settings
from core.transfers import TransferRequest, move_money
from core.unit_of_work import UnitOfWork


def _naive_publisher() -> Callable[[str, dict[str, Any]], None]:
    settings = get_settings()
    celery = Celery(broker=settings.celery_broker_url)
    celery.conf.update(task_serializer="json", task_default_queue=os.environ.get("BENCH_NAIVE_QUEUE", "bench-naive"))

    def declared(**kwargs: Any) -> None:
        """Only the name matters: this process publishes, the worker executes."""

    tasks = {name: celery.task(name=name)(declared) for name in ("send_transaction_email", "audit_log_transaction")}

    def publish(name: str, kwargs: dict[str, Any]) -> None:
        tasks[name].delay(**kwargs)

    return publish


def create_baseline(variant: str) -> FastAPI:
    settings = get_settings()
    publish = _naive_publisher() if variant == "naive" else None
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings)
        state["sessions"] = create_session_factory(engine)
        yield
        await engine.dispose()

    app = FastAPI(lifespan=lifespan)
    install_error_handlers(app)

    @app.post("/api/v1/transactions/transfer", status_code=201)
    async def transfer(body: TransferCreate) -> TransactionOut:
        request = TransferRequest(body.from_account_id, body.to_account_id, body.amount)
        async with UnitOfWork(state["sessions"]) as uow:
            facts = await move_money(uow.session, request)
            await uow.commit()
        if publish is not None:
            for message in transfer_messages(facts):
                publish(message.task_name, message.kwargs)  # blocking, as the naive design does
        return TransactionOut(
            id=facts.transaction_id,
            from_account_id=facts.from_account_id,
            to_account_id=facts.to_account_id,
            amount=facts.amount,
            currency=facts.currency,
            status=facts.status,
            created_at=facts.created_at,
        )

    return app


_VARIANT = os.environ.get("BENCH_VARIANT", "outbox")
app = create_app() if _VARIANT == "outbox" else create_baseline(_VARIANT)
