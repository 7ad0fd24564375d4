"""The API measures itself on its own /metrics port: the scrape shows what the requests did."""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine

from api.main import create_app
from core.settings import Settings
from devservers.embedded import free_port

TRANSFER = "/api/v1/transactions/transfer"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield http


def scrape(port: int) -> Samples:
    """Every sample the metrics port serves, keyed by (name, labels)."""
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    response.raise_for_status()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def _account(http: httpx.AsyncClient, balance: str = "100.00") -> str:
    response = await http.post(
        "/api/v1/accounts", json={"owner_email": "o@example.com", "currency": "EUR", "initial_balance": balance}
    )
    assert response.status_code == 201, response.text
    account_id: str = response.json()["id"]
    return account_id


async def test_the_metrics_port_shows_requests_by_route_template_and_transfers_by_outcome(
    settings: Settings, engine: AsyncEngine
) -> None:
    app = create_app(settings)
    async with serving(app) as http:
        source, target = await _account(http), await _account(http, "0.00")
        body = {"from_account_id": source, "to_account_id": target, "amount": "1.00"}
        assert (await http.post(TRANSFER, json=body, headers={"Idempotency-Key": "k1"})).status_code == 201
        assert (await http.post(TRANSFER, json=body, headers={"Idempotency-Key": "k1"})).status_code == 200
        assert (await http.post(TRANSFER, json={**body, "amount": "1000.00"})).status_code == 409
        assert (await http.post(TRANSFER, json={**body, "amount": "-1"})).status_code == 422
        assert (await http.post(TRANSFER, json={**body, "amount": "1000000.01"})).status_code == 422
        unknown = {**body, "to_account_id": str(uuid.uuid4())}
        assert (await http.post(TRANSFER, json=unknown)).status_code == 404
        assert (await http.get(f"/api/v1/accounts/{source}")).status_code == 200
        assert (await http.get(f"/api/v1/accounts/{uuid.uuid4()}")).status_code == 404
        assert (await http.get("/no/such/path")).status_code == 404
        assert (await http.get("/health/live")).status_code == 200
        samples = scrape(settings.api_metrics_port)

    def requests(handler: str, method: str, status: str) -> float:
        return value(samples, "http_requests_total", handler=handler, method=method, status=status)

    assert requests("/api/v1/accounts", "POST", "201") == 2
    assert requests(TRANSFER, "POST", "201") == 1
    assert requests(TRANSFER, "POST", "200") == 1
    assert requests(TRANSFER, "POST", "422") == 2
    assert requests("/api/v1/accounts/{account_id}", "GET", "200") == 1
    assert requests("/api/v1/accounts/{account_id}", "GET", "404") == 1
    assert requests("none", "GET", "404") == 1  # an unknown path never becomes a label value
    histogram = {"handler": TRANSFER, "method": "POST", "status": "201"}
    assert value(samples, "http_request_duration_seconds_count", **histogram) == 1
    assert value(samples, "http_request_duration_seconds_bucket", **histogram, le="+Inf") == 1
    assert not [labels for name, labels in samples if ("handler", "/health/live") in labels], "probes are not counted"
    assert {dict(labels)["handler"] for name, labels in samples if name == "http_requests_total"} == {
        "/api/v1/accounts",
        "/api/v1/accounts/{account_id}",
        TRANSFER,
        "none",
    }

    def transfers(outcome: str, reason: str = "") -> float:
        return value(samples, "transfers_total", outcome=outcome, reason=reason)

    assert transfers("created") == 1
    assert transfers("replayed") == 1
    assert transfers("refused", "insufficient_funds") == 1
    assert transfers("refused", "validation_error") == 2  # a body the schema refuses, an amount above the maximum
    assert transfers("refused", "account_not_found") == 1
    assert value(samples, "process_cpu_seconds_total") > 0


async def test_an_unreachable_database_counts_as_unavailable(settings: Settings) -> None:
    down = settings.model_copy(update={"database_url": "postgresql://postgres@127.0.0.1:1/nowhere"})
    app = create_app(down)
    async with serving(app) as http:
        body = {"from_account_id": str(uuid.uuid4()), "to_account_id": str(uuid.uuid4()), "amount": "1.00"}
        assert (await http.post(TRANSFER, json=body)).status_code == 503
        samples = scrape(down.api_metrics_port)
    assert value(samples, "transfers_total", outcome="unavailable", reason="database_unavailable") == 1


async def test_two_apps_in_one_process_count_separately(settings: Settings, engine: AsyncEngine) -> None:
    """A registry per app: no duplicate-metric error, and neither app sees the other's requests."""
    other = settings.model_copy(update={"api_metrics_port": free_port()})
    first, second = create_app(settings), create_app(other)
    async with serving(first) as http_first, serving(second) as http_second:
        await _account(http_first)
        await _account(http_first)
        await _account(http_second)
        counts = [
            value(scrape(port), "http_requests_total", handler="/api/v1/accounts", method="POST", status="201")
            for port in (settings.api_metrics_port, other.api_metrics_port)
        ]
    assert counts == [2, 1]


async def test_port_zero_measures_nothing(settings: Settings, engine: AsyncEngine) -> None:
    app = create_app(settings.model_copy(update={"api_metrics_port": 0}))
    assert app.state.metrics is None
    async with serving(app) as http:
        source, target = await _account(http), await _account(http)
        body = {"from_account_id": source, "to_account_id": target, "amount": "1.00"}
        assert (await http.post(TRANSFER, json=body)).status_code == 201
        assert (await http.post(TRANSFER, json={**body, "amount": "-1"})).status_code == 422


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        yield holder.getsockname()[1]


async def test_a_taken_metrics_port_stops_start_up_naming_the_variable(settings: Settings, taken_port: int) -> None:
    app = create_app(settings.model_copy(update={"api_metrics_port": taken_port}))
    with pytest.raises(RuntimeError, match=f"API_METRICS_PORT={taken_port}"):
        async with app.router.lifespan_context(app):
            pass
