"""schemathesis over the OpenAPI document, with a client's key: whatever it sends, no 500.

Bounded (EXAMPLES per operation and generation mode) so that it runs in well under a minute.
Requests go to the real app in-process, on the test database.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from api.main import create_app
from core.settings import Settings
from tests.support.api import OPERATOR_HEADERS, bearer, open_account

EXAMPLES = 40


def test_no_generated_request_gets_a_500(settings: Settings, engine: object) -> None:
    app = create_app(settings)
    loop = asyncio.new_event_loop()
    lifespan = app.router.lifespan_context(app)
    loop.run_until_complete(lifespan.__aenter__())
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    http = httpx.AsyncClient(transport=transport, base_url="http://test")
    try:
        headers = loop.run_until_complete(_client_with_an_account(transport))
        schema = schemathesis.openapi.from_dict(app.openapi())
        operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
        assert len(operations) >= 8
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                _fuzz(operation, mode, loop, http, headers)
    finally:
        loop.run_until_complete(http.aclose())
        loop.run_until_complete(lifespan.__aexit__(None, None, None))
        loop.close()


async def _client_with_an_account(transport: httpx.ASGITransport) -> dict[str, str]:
    async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=OPERATOR_HEADERS) as operator:
        created = (await operator.post("/api/v1/clients", json={"name": "fuzzer"})).json()
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers=bearer(created["api_key"])
        ) as c:
            await open_account(c, operator, "100.00")
    return bearer(created["api_key"])


def _fuzz(
    operation: Any,
    mode: GenerationMode,
    loop: asyncio.AbstractEventLoop,
    http: httpx.AsyncClient,
    headers: dict[str, str],
) -> None:
    @hypothesis_settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: Any) -> None:
        request = case.as_transport_kwargs(base_url="http://test", headers=headers)
        response = loop.run_until_complete(
            http.request(
                request["method"],
                request["url"],
                headers=request.get("headers"),
                params=request.get("params"),
                content=_body(request),
            )
        )
        case.validate_response(response, checks=[not_a_server_error])

    try:
        check()
    except Unsatisfiable:
        # An operation with nothing to get wrong (no parameters, no body) has no negative cases.
        assert mode is GenerationMode.NEGATIVE, operation.label


def _body(request: dict[str, Any]) -> bytes | None:
    if "json" in request:
        return json.dumps(request["json"]).encode()
    data = request.get("data")
    if isinstance(data, str):
        return data.encode()
    return data if isinstance(data, bytes) else None
