"""The API exports exactly the metrics monitoring/metrics.yml lists for it, with the catalog's labels and buckets."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from api.main import create_app
from api.metrics import HTTP_BUCKETS, ApiMetrics
from core.settings import Settings
from tests.support.monitoring import catalog

STANDARD = ("process_", "python_")


def _metrics() -> ApiMetrics:
    app = create_app(Settings(_env_file=None, api_metrics_port=9100))  # never started: nothing listens
    metrics = app.state.metrics
    assert isinstance(metrics, ApiMetrics)
    return metrics


def _exported(registry: CollectorRegistry) -> dict[str, str]:
    """Name -> type of every metric family, counters under their `_total` name, standard ones left out."""
    return {
        (family.name + "_total" if family.type == "counter" else family.name): family.type
        for family in registry.collect()
        if not family.name.startswith(STANDARD)
    }


def test_the_api_exports_its_catalog_metrics_and_no_others() -> None:
    expected = {metric.name: metric.type for metric in catalog().values() if metric.job == "api"}
    assert _exported(_metrics().registry) == expected


def test_labels_and_buckets_follow_the_catalog() -> None:
    metrics = _metrics()
    metrics.transfer_answered(created=True)
    metrics.transfer_refused(409, "insufficient_funds")
    assert catalog()["transfers_total"].labels == ("outcome", "reason")
    assert metrics.registry.get_sample_value("transfers_total", {"outcome": "created", "reason": ""}) == 1
    assert metrics.registry.get_sample_value("transfers_total", {"outcome": "refused", "reason": "insufficient_funds"})
    assert catalog()["http_request_duration_seconds"].buckets == HTTP_BUCKETS


def test_the_process_metrics_come_along_without_created_series() -> None:
    names = {sample.name for family in _metrics().registry.collect() for sample in family.samples}
    assert "process_cpu_seconds_total" in names
    assert not [name for name in names if name.endswith("_created")]
