"""The relay's and the worker's /metrics, scraped during and after a run of transfers: every metric
of their catalog jobs exists, the counts match the run, and outbox_broker_up drops to 0 while the
broker is stopped."""

from __future__ import annotations

from functools import partial

import httpx
import pytest

from devservers.embedded import free_port
from tests.support.database import select
from tests.support.metrics import Samples, scrape, scrape_families, total
from tests.support.monitoring import catalog
from tests.support.outbox import all_completed
from tests.support.system import System
from tests.support.waiting import wait_until

RELAY_PORT, WORKER_PORT = free_port(), free_port()
TRANSFERS = 6


@pytest.fixture
def system_env() -> dict[str, str]:
    return {
        "RELAY_METRICS_PORT": str(RELAY_PORT),
        "WORKER_METRICS_PORT": str(WORKER_PORT),
        "RELAY_METRICS_INTERVAL": "0.3",
    }


def test_relay_and_worker_metrics_follow_a_run_and_the_broker(system: System) -> None:
    for job, port in (("relay", RELAY_PORT), ("worker", WORKER_PORT)):
        wait_until(partial(_answers, port), 30, f"{job} /metrics")
    source, target = system.open_accounts(2)
    with system.holder() as client:
        for _ in range(TRANSFERS):
            system.transfer(client, source, target)
        during = scrape_families(RELAY_PORT)[0] | scrape_families(WORKER_PORT)[0]  # scraped while the tasks run
    wait_until(lambda: all_completed(system.database_url), 30, "every row completed")
    rows = select(system.database_url, "SELECT task_name, count(*) AS n FROM outbox GROUP BY task_name")
    by_task = {r["task_name"]: r["n"] for r in rows}
    count = sum(by_task.values())  # the transfers' rows and the deposits'

    expected = {name: metric for name, metric in catalog().items() if metric.job in ("relay", "worker")}
    relay_families, relay = scrape_families(RELAY_PORT)
    worker_families, _ = scrape_families(WORKER_PORT)
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
        lambda: total(scrape(RELAY_PORT), "outbox_rows", state="completed") == count,
        10,
        "outbox_rows sampled",
    )
    relay = scrape(RELAY_PORT)
    assert total(relay, "outbox_rows", state="pending") == total(relay, "outbox_oldest_pending_age_seconds") == 0
    assert total(relay, "outbox_oldest_unfinished_age_seconds") == 0

    # The worker's counts catch up as soon as each task's result is stored.
    def worker_done() -> Samples | None:
        samples = scrape(WORKER_PORT)
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
        wait_until(lambda: total(scrape(RELAY_PORT), "outbox_broker_up") == 0, 15, "outbox_broker_up == 0")
    finally:
        system.redis.start()
    wait_until(lambda: total(scrape(RELAY_PORT), "outbox_broker_up") == 1, 20, "outbox_broker_up == 1 again")


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
