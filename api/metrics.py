"""The API's Prometheus metrics: HTTP requests by route template and status, and transfers by outcome.

They live in a registry of the app's own, served on API_METRICS_PORT (not on the API's port, so
/metrics is never public by accident). API_METRICS_PORT=0 leaves the app uninstrumented: no
middleware, no counters, nothing measured.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry, Counter
from prometheus_fastapi_instrumentator import Instrumentator
from prometheus_fastapi_instrumentator import metrics as http_metrics

from core.metrics import new_registry

# The transfer route's name: errors raised before or inside it are counted as refused transfers.
TRANSFER_ROUTE = "transfer"

# Seconds. The API answers in milliseconds; the top buckets catch a stalled database.
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ApiMetrics:
    """What the API counts besides HTTP requests. One instance per app, on that app's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._transfers = Counter(
            "transfers_total",
            "Transfer requests by outcome (created, replayed, refused, unavailable, error) and refusal reason.",
            ["outcome", "reason"],
            registry=registry,
        )
        # Resolved once: the hot path only increments.
        self._created = self._transfers.labels("created", "")
        self._replayed = self._transfers.labels("replayed", "")

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


def instrument(app: FastAPI) -> ApiMetrics:
    """Add the HTTP metrics middleware to `app` and return its metrics, on a registry of their own.

    Requests are labelled by route template (`/api/v1/accounts/{account_id}`, never the id itself);
    a path that matches no route counts as handler `none`. The health probes are not counted.
    """
    registry = new_registry()
    instrumentator = Instrumentator(
        should_group_status_codes=False,  # a 409 and a 422 mean different things here
        should_group_untemplated=True,
        excluded_handlers=["^/health/"],
        registry=registry,
    )
    instrumentator.add(
        http_metrics.requests(registry=registry),
        http_metrics.latency(buckets=HTTP_BUCKETS, registry=registry),
    )
    instrumentator.instrument(app)
    return ApiMetrics(registry)


def count_refused_transfer(request: Request, status: int, code: str) -> None:
    """Count an error answer as a refused transfer, when the request was a transfer and metrics are on."""
    route = request.scope.get("route")
    if getattr(route, "name", None) != TRANSFER_ROUTE:
        return
    metrics: ApiMetrics | None = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.transfer_refused(status, code)
