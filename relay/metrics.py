"""The relay's Prometheus metrics (monitoring/metrics.yml, job `relay`), served on RELAY_METRICS_PORT.

Counters and histograms are updated by each batch after its commit (relay.batch) and by the
reconciler; `outbox_broker_up` follows the relay's broker watch. The table-wide figures
(`outbox_rows`, the two ages) are sampled every RELAY_METRICS_INTERVAL seconds by a task of the
relay's own (relay.daemon), with the queries `python -m relay status` runs, never on a scrape.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from core.metrics import new_registry
from core.outbox import queries
from core.outbox.queries import Connection, OutboxRow
from core.outbox.states import ALL_OUTBOX_STATES

# Seconds; the catalog's buckets (alert thresholds sit on their boundaries).
PUBLISH_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip
BATCH_ROWS_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
BATCH_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# outbox_publish_errors_total{kind}: the broker could not be reached (the row is left pending and the
# relay waits for the broker), the broker or the message builder refused the message (an attempt is
# counted), or the row can never become a task (marked dead at once).
UNREACHABLE, REFUSED, POISON = "unreachable", "refused", "poison"
ERROR_KINDS = (UNREACHABLE, REFUSED, POISON)


def relay_version() -> str:
    try:
        return metadata.version("outbox-transfers")
    except metadata.PackageNotFoundError:
        return "unknown"


class RelayMetrics:
    """One relay process's metrics, on a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry = registry or new_registry()
        self._rows = Gauge("outbox_rows", "Outbox rows per state, sampled.", ["state"], registry=registry)
        for state in ALL_OUTBOX_STATES:
            self._rows.labels(str(state))
        self._oldest_pending = Gauge(
            "outbox_oldest_pending_age_seconds", "Age of the oldest pending row (0 when none).", registry=registry
        )
        self._oldest_unfinished = Gauge(
            "outbox_oldest_unfinished_age_seconds",
            "Age of the oldest row published but not completed, since its publish (0 when none).",
            registry=registry,
        )
        self.published = Counter("outbox_published", "Messages the broker accepted.", registry=registry)
        self._errors = Counter(
            "outbox_publish_errors", "Failed publish attempts, by kind.", ["kind"], registry=registry
        )
        self._error_kinds = {kind: self._errors.labels(kind) for kind in ERROR_KINDS}
        self.dead = Counter("outbox_dead", "Rows this relay marked dead.", registry=registry)
        self.republished = Counter(
            "outbox_republished", "Published rows the reconciler put back to pending.", registry=registry
        )
        self.reconcile_runs = Counter(
            "outbox_reconcile_runs", "Passes of the reconciler over the published rows.", registry=registry
        )
        self._publish_latency = Histogram(
            "outbox_publish_latency_seconds",
            "Commit to broker acceptance of each published row.",
            buckets=PUBLISH_LATENCY_BUCKETS,
            registry=registry,
        )
        self._batch_rows = Histogram(
            "outbox_batch_rows", "Rows claimed per non-empty batch.", buckets=BATCH_ROWS_BUCKETS, registry=registry
        )
        self._batch_duration = Histogram(
            "outbox_batch_duration_seconds",
            "One batch, from claim to commit.",
            buckets=BATCH_DURATION_BUCKETS,
            registry=registry,
        )
        self._broker_up = Gauge(
            "outbox_broker_up", "1 when the last contact with the broker succeeded.", registry=registry
        )
        self._broker_up.set(1)
        info = Gauge("outbox_relay_info", "Always 1; the label says which build runs.", ["version"], registry=registry)
        info.labels(relay_version()).set(1)

    def broker_contact(self, *, ok: bool) -> None:
        self._broker_up.set(1 if ok else 0)

    def publish_errors(self, kind: str, count: int) -> None:
        if count:
            self._error_kinds[kind].inc(count)

    def batch(
        self, claimed: int, seconds: float, published: Iterable[OutboxRow], accepted_at: float, dead: int
    ) -> None:
        """A committed non-empty batch: `published` went to the broker, which answered at `accepted_at`
        (time.time()); `dead` rows were marked dead (poisoned, or attempts used up)."""
        self._batch_rows.observe(claimed)
        self._batch_duration.observe(seconds)
        count = 0
        observe = self._publish_latency.observe
        for row in published:
            count += 1
            if row.created_at is not None:
                observe(max(accepted_at - row.created_at.timestamp(), 0.0))
        if count:
            self.published.inc(count)
        if dead:
            self.dead.inc(dead)

    def reconciled(self, republished: int, dead: int) -> None:
        self.reconcile_runs.inc()
        if republished:
            self.republished.inc(republished)
        if dead:
            self.dead.inc(dead)

    async def sample(self, connection: Connection) -> None:
        """Rows per state and the two ages, by the queries of `python -m relay status`."""
        counts = await queries.state_counts(connection)
        figures = await queries.figures(connection)
        for state, n in counts.items():
            self._rows.labels(state).set(n)
        self._oldest_pending.set(float(figures["oldest_pending_s"] or 0))
        self._oldest_unfinished.set(float(figures["oldest_published_s"] or 0))
