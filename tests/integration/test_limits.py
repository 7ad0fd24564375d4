"""The edge under pressure: a client over its rate limit gets 429 while others carry on, and API
processes reserving its slots in chunks never admit beyond its budget together; an exhausted
pool, a held lock or a slow statement get 503 with Retry-After, never a 500."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import pytest
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from sqlalchemy.ext.asyncio import AsyncEngine

from api.main import create_app
from api.ratelimit import RESERVATION_SHARE, RateLimited, RateLimiter
from core.settings import Settings
from tests.support.api import OPERATOR_HEADERS, bearer, new_client_key, open_account


@asynccontextmanager
async def app_with(settings: Settings, **changes: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """(an HTTP client with the operator's key, the app) for settings with `changes`."""
    app = create_app(settings.model_copy(update=changes))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=OPERATOR_HEADERS) as http:
            yield http, app


class _Collect(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _as(http: httpx.AsyncClient, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=http._transport, base_url="http://test", headers=bearer(key))


@pytest.mark.parametrize("storage", ["shared", "unreachable"])
async def test_a_burst_over_the_limit_gets_429_while_another_client_carries_on(
    settings: Settings, engine: AsyncEngine, storage: str
) -> None:
    # A limit per minute: the burst cannot outlast the window on a slow machine.
    changes: dict[str, Any] = {"rate_limit": "5/minute"}
    if storage == "unreachable":  # Redis is down: each process counts in memory, and says so once
        changes["rate_limit_storage_url"] = f"redis://127.0.0.1:1/{uuid.uuid4().int % 16}"
    records: list[logging.LogRecord] = []
    handler = _Collect(records)
    logger = logging.getLogger("api.ratelimit")
    logger.addHandler(handler)  # on the logger itself: the app's lifespan replaces the root's handlers
    try:
        async with app_with(settings, **changes) as (operator, _):
            (_, greedy_key), (_, calm_key) = await new_client_key(operator, "greedy"), await new_client_key(operator)
            async with _as(operator, greedy_key) as greedy, _as(operator, calm_key) as calm:
                path = f"/api/v1/accounts/{uuid.uuid4()}"
                burst = await asyncio.gather(*(greedy.get(path) for _ in range(12)))
                statuses = Counter(answer.status_code for answer in burst)
                assert statuses == {404: 5, 429: 7}, statuses
                refused = next(answer for answer in burst if answer.status_code == 429)
                assert int(refused.headers["Retry-After"]) >= 1
                assert refused.json()["error"]["code"] == "rate_limited"
                # The other client's budget is its own.
                calm_answers = [await calm.get(path) for _ in range(5)]
                assert [answer.status_code for answer in calm_answers] == [404] * 5
    finally:
        logger.removeHandler(handler)
    if storage == "unreachable":
        warnings = [r for r in records if "shared counters are unavailable" in r.getMessage()]
        assert len(warnings) == 1, [r.getMessage() for r in records]
    else:
        assert any("counted in Redis" in r.getMessage() for r in records)


async def test_an_exhausted_pool_is_503_with_retry_after(settings: Settings, engine: AsyncEngine) -> None:
    async with app_with(settings, db_pool_size=1, db_max_overflow=0, db_pool_timeout=0.3) as (operator, app):
        async with app.state.services.engine.connect() as held:  # the pool's one connection, held
            answer = await operator.get(f"/api/v1/accounts/{uuid.uuid4()}")
            assert held is not None
        assert answer.status_code == 503, answer.text
        assert answer.headers["Retry-After"] == "1"
        assert answer.json()["error"]["code"] == "database_busy"
        after = await operator.get(f"/api/v1/accounts/{uuid.uuid4()}")
        assert after.status_code == 404, "the pool serves again once the connection is back"


@pytest.mark.parametrize(
    ("changes", "cancelled_by"),
    [
        ({"db_lock_timeout": 0.3, "db_statement_timeout": 30.0}, "lock_timeout"),
        ({"db_lock_timeout": 30.0, "db_statement_timeout": 0.3}, "statement_timeout"),
    ],
)
async def test_a_held_account_lock_gets_503_not_a_hang(
    settings: Settings, engine: AsyncEngine, db: asyncpg.Connection, changes: dict[str, float], cancelled_by: str
) -> None:
    async with app_with(settings, **changes) as (operator, _):
        _, key = await new_client_key(operator)
        async with _as(operator, key) as client:
            source, target = await open_account(client, operator, "10.00"), await open_account(client, operator)
            async with db.transaction():
                await db.execute("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE", uuid.UUID(source))
                answer = await asyncio.wait_for(
                    client.post(
                        "/api/v1/transactions/transfer",
                        json={"from_account_id": source, "to_account_id": target, "amount": "1.00"},
                    ),
                    timeout=10,
                )
            assert answer.status_code == 503, (cancelled_by, answer.text)
            assert answer.headers["Retry-After"]
            assert (await client.get(f"/api/v1/accounts/{source}")).json()["balance"] == "10.00"


class _Clock:
    """The limiter's clock, moved by the test: reservations lapse when the test says so, not with time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _admitted(limiter: RateLimiter, caller: str, requests: int) -> int:
    admitted = 0
    for _ in range(requests):
        try:
            await limiter.hit(caller)
        except RateLimited:
            continue
        admitted += 1
    return admitted


async def test_processes_reserve_slots_in_chunks_and_never_admit_beyond_the_shared_budget(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two API processes (two limiters on one Redis) serving one client: a busy client costs a Redis
    call per chunk, not per request, and the two together admit at most the budget, short of it by
    at most one unused chunk each."""
    calls = Counter[int]()
    hit = SlidingWindowCounterRateLimiter.hit

    async def counted(self: SlidingWindowCounterRateLimiter, *args: Any, cost: int = 1) -> bool:
        calls[cost] += 1
        return await hit(self, *args, cost=cost)

    monkeypatch.setattr(SlidingWindowCounterRateLimiter, "hit", counted)
    clock = _Clock()
    # A minute's window: Redis's window cannot move on during the test.
    first, second = (RateLimiter("200/minute", settings.rate_limit_storage, clock) for _ in range(2))
    caller = str(uuid.uuid4())
    period = 60 / RESERVATION_SHARE
    assert await _admitted(first, caller, 30) == 30  # a client first seen: one request at a time
    assert calls == {1: 30}
    clock.now += period
    assert await _admitted(first, caller, 40) == 40  # what it served last period, capped at 200/10
    assert calls[20] == 2
    assert await _admitted(second, caller, 10) == 10
    clock.now += period
    admitted = 80 + await _admitted(first, caller, 100) + await _admitted(second, caller, 100)
    assert 200 - 2 * 20 <= admitted <= 200, admitted
    refusals = 280 - admitted
    # Once a chunk no longer fits, one call per request: a refused one costs what it did before.
    assert sum(calls.values()) <= 30 + 2 + 10 + admitted // 10 + refusals + 4, calls


async def test_a_lapsed_reservation_is_not_spent(settings: Settings) -> None:
    clock = _Clock()
    limiter = RateLimiter("100/minute", settings.rate_limit_storage, clock)
    caller = str(uuid.uuid4())
    period = 60 / RESERVATION_SHARE
    assert await _admitted(limiter, caller, 10) == 10
    clock.now += period
    assert await _admitted(limiter, caller, 1) == 1  # reserves a chunk of 10, spends one
    clock.now += period  # the 9 left lapse: counted in Redis, refused to the client
    assert await _admitted(limiter, caller, 100) == 100 - 20
