"""The API's Prometheus metrics: HTTP requests by route template and status, and transfers by outcome.

They live in a registry of the app's own, served on API_METRICS_PORT (not on the API's port, so
/metrics is never public by accident). API_METRICS_PORT=0 leaves the app uninstrumented: no
middleware, no counters, nothing measured.

The HTTP metrics are recorded by `HttpMetrics`, a plain ASGI middleware, instead of
prometheus-fastapi-instrumentator: that one matched every request against the whole route table
again, built a Request and a Response object per request and ran its instrumentations through
`asyncio.gather`, about 6% of a transfer's CPU. This one reads the route the router already put
in the scope and increments two label children it keeps resolved.
"""

from __future__ import annotations

from time import perf_counter

from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.metrics import new_registry

# The transfer route's name: errors raised before or inside it are counted as refused transfers.
TRANSFER_ROUTE = "transfer"

# Seconds. The API answers in milliseconds; the top buckets catch a stalled database.
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# The label of a request no route matched: a raw path never becomes a label value.
UNMATCHED = "none"
# Not counted: the probes would drown the requests.
UNCOUNTED_PREFIX = "/health/"
HTTP_LABELS = ("handler", "method", "status")
# The method label's values: a method a client invents becomes `other`, never a label value of its own.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})
OTHER_METHOD = "other"


class ApiMetrics:
    """What the API counts. One instance per app, on that app's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._requests = Counter(
            "http_requests",
            "HTTP requests by route template (`none` for a path no route matches), method and status code.",
            HTTP_LABELS,
            registry=registry,
        )
        self._duration = Histogram(
            "http_request_duration_seconds",
            "Time from the request's arrival to its response, by route template, method and status code.",
            HTTP_LABELS,
            buckets=HTTP_BUCKETS,
            registry=registry,
        )
        # Resolved once per (handler, method, status): the hot path only increments and observes.
        # Bounded by the routes, HTTP_METHODS and the status codes the app answers with.
        self._http: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._transfers = Counter(
            "transfers_total",
            "Transfer requests by outcome (created, replayed, refused, unavailable, error) and refusal reason.",
            ["outcome", "reason"],
            registry=registry,
        )
        self._created = self._transfers.labels("created", "")
        self._replayed = self._transfers.labels("replayed", "")

    def request_answered(self, handler: str, method: str, status: int, seconds: float) -> None:
        """One HTTP request answered with `status` after `seconds`."""
        if method not in HTTP_METHODS:
            method = OTHER_METHOD
        key = (handler, method, status)
        children = self._http.get(key)
        if children is None:
            labels = (handler, method, str(status))
            children = self._http[key] = (self._requests.labels(*labels), self._duration.labels(*labels))
        children[0].inc()
        children[1].observe(seconds)

    def transfer_answered(self, *, created: bool) -> None:
        """A transfer that succeeded: made now (201) or an idempotent replay of an earlier one (200)."""
        (self._created if created else self._replayed).inc()

    def transfer_refused(self, status: int, code: str) -> None:
        """A transfer answered with an error body; `code` is that body's stable error code."""
        if status == 503:
            outcome = "unavailable"
        elif status >= 500:
            outcome = "error"
        else:
            outcome = "refused"
        self._transfers.labels(outcome, code).inc()


class HttpMetrics:
    """Counts every HTTP request but the health probes, by the route template the router matched.

    The status is the one the response started with; a request that raised before answering
    counts as 500 (the server's error handler, outside this middleware, answers it so).
    """

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(UNCOUNTED_PREFIX):
            await self.app(scope, receive, send)
            return
        started = perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            handler = getattr(scope.get("route"), "path", None) or UNMATCHED
            self.metrics.request_answered(handler, scope["method"], status, perf_counter() - started)


def instrument(app: FastAPI) -> ApiMetrics:
    """Add the HTTP metrics middleware to `app` and return its metrics, on a registry of their own.

    Requests are labelled by route template (`/api/v1/accounts/{account_id}`, never the id itself);
    a path that matches no route counts as handler `none`. The health probes are not counted.
    """
    metrics = ApiMetrics(new_registry())
    app.add_middleware(HttpMetrics, metrics=metrics)
    return metrics


def count_refused_transfer(request: Request, status: int, code: str) -> None:
    """Count an error answer as a refused transfer, when the request was a transfer and metrics are on."""
    route = request.scope.get("route")
    if getattr(route, "name", None) != TRANSFER_ROUTE:
        return
    metrics: ApiMetrics | None = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.transfer_refused(status, code)
