"""The relay's and the worker's /metrics, scraped during and after a run of transfers: every metric
of their catalog jobs exists, the counts match the run, and outbox_broker_up drops to 0 while the
broker is stopped."""

from __future__ import annotations

from functools import partial

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devservers.embedded import free_port
from tests.e2e.queries import all_completed, fetch
from tests.e2e.system import System, wait_until
from tests.monitoring import catalog

RELAY_PORT, WORKER_PORT = free_port(), free_port()
TRANSFERS = 6

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def system_env() -> dict[str, str]:
    return {
        "RELAY_METRICS_PORT": str(RELAY_PORT),
        "WORKER_METRICS_PORT": str(WORKER_PORT),
        "RELAY_METRICS_INTERVAL": "0.3",
    }


def scrape(port: int) -> tuple[set[str], Samples]:
    """The metric families (by their catalog name) and every sample the port serves."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    families, samples = set(), {}
    for family in text_string_to_metric_families(text):
        families.add(family.name + ("_total" if family.type == "counter" else ""))
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return families, samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(value for (sample, found), value in samples.items() if sample == name and wanted <= found)


def test_relay_and_worker_metrics_follow_a_run_and_the_broker(system: System) -> None:
    for job, port in (("relay", RELAY_PORT), ("worker", WORKER_PORT)):
        wait_until(partial(_answers, port), 30, f"{job} /metrics")
    source, target = system.open_accounts(2)
    with system.holder() as client:
        for _ in range(TRANSFERS):
            system.transfer(client, source, target)
        during = scrape(RELAY_PORT)[0] | scrape(WORKER_PORT)[0]  # scraped while the tasks run
    wait_until(lambda: all_completed(system.database_url), 30, "every row completed")
    rows = fetch(system.database_url, "SELECT task_name, count(*) AS n FROM outbox GROUP BY task_name")
    by_task = {r["task_name"]: r["n"] for r in rows}
    count = sum(by_task.values())  # the transfers' rows and the deposits'

    expected = {name: metric for name, metric in catalog().items() if metric.job in ("relay", "worker")}
    relay_families, relay = scrape(RELAY_PORT)
    worker_families, _ = scrape(WORKER_PORT)
    assert {n for n, m in expected.items() if m.job == "relay"} <= relay_families
    assert {n for n, m in expected.items() if m.job == "worker"} <= worker_families
    assert set(expected) <= during

    assert total(relay, "outbox_published_total") == count
    assert total(relay, "outbox_publish_latency_seconds_count") == count
    assert total(relay, "outbox_batch_rows_sum") == count
    assert total(relay, "outbox_batch_rows_count") == total(relay, "outbox_batch_duration_seconds_count") >= 1
    assert total(relay, "outbox_publish_errors_total") == total(relay, "outbox_dead_total") == 0
    assert total(relay, "outbox_broker_up") == 1
    assert total(relay, "outbox_relay_info") == 1
    # The sampled figures catch up with the run within a sampling interval.
    wait_until(
        lambda: total(scrape(RELAY_PORT)[1], "outbox_rows", state="completed") == count, 10, "outbox_rows sampled"
    )
    relay = scrape(RELAY_PORT)[1]
    assert total(relay, "outbox_rows", state="pending") == total(relay, "outbox_oldest_pending_age_seconds") == 0
    assert total(relay, "outbox_oldest_unfinished_age_seconds") == 0

    # The worker's counts catch up as soon as each task's result is stored.
    def worker_done() -> Samples | None:
        samples = scrape(WORKER_PORT)[1]
        return samples if total(samples, "outbox_completion_latency_seconds_count") == count else None

    worker = wait_until(worker_done, 10, "worker metrics")
    for task, n in by_task.items():
        assert total(worker, "outbox_tasks_total", task=task, outcome="succeeded") == n
        assert total(worker, "outbox_task_duration_seconds_count", task=task) == n
        assert total(worker, "outbox_completion_latency_seconds_count", task=task) == n
    assert total(worker, "outbox_tasks_total", outcome="failed") == 0
    assert total(worker, "outbox_duplicates_absorbed_total") == 0

    system.redis.stop()
    try:
        wait_until(lambda: total(scrape(RELAY_PORT)[1], "outbox_broker_up") == 0, 15, "outbox_broker_up == 0")
    finally:
        system.redis.start()
    wait_until(lambda: total(scrape(RELAY_PORT)[1], "outbox_broker_up") == 1, 20, "outbox_broker_up == 1 again")


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
