"""`python -m bench [--quick] [--only SCENARIO ...]`: every figure, with ratios against baselines."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench import api_cost, capacity, relay_scenarios, worker_cost
from bench.environment import ROOT, bench_redis_url, fresh_database, tuned_settings
from bench.report import chart, print_table, targets
from bench.stats import Figure


@dataclass(frozen=True)
class Plan:
    connections: list[int]
    http_seconds: float
    repeats: int
    backlog: int
    baseline_backlog: int
    memory_backlogs: tuple[int, int]
    rates: list[int]
    latency_seconds: float
    capacity_transfers: int
    capacity_rates: list[int]
    capacity_seconds: float
    capacity_configurations: list[tuple[capacity.Delays, int, bool]]
    worker_cost_tasks: int
    backoff_rows: int
    backoff_seconds: float


_EVERY_PIPELINE = [
    (capacity.ZERO, 1, False),
    (capacity.ZERO, 2, False),
    (capacity.SEED, 1, False),
    (capacity.SEED, 2, False),
    (capacity.ZERO, 1, True),
    (capacity.SEED, 1, True),
]
FULL = Plan(
    [1, 16, 64],
    8.0,
    3,
    100_000,
    20_000,
    (100_000, 1_000_000),
    [200, 1000],
    5.0,
    600,
    [25, 50, 100, 150, 200, 300, 400],
    15.0,
    _EVERY_PIPELINE,
    4000,
    100_000,
    15.0,
)
# The backoff scenario fills 100,000 rows in about a second and measures for a few: cheap enough here
# (the quick run measures only the broker-down figure).
QUICK = Plan(
    [16],
    1.0,
    1,
    10_000,
    1_000,
    (5_000, 25_000),
    [200],
    1.0,
    30,
    [50, 150],
    5.0,
    [(capacity.ZERO, 1, False)],
    1000,
    100_000,
    3.0,
)
SCENARIOS = ("api", "throughput", "latency", "memory", "worker", "backoff", "worker-cost", "capacity")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, one repeat, no broker-down run: a smoke run under a minute"
    )
    parser.add_argument("--only", nargs="*", choices=SCENARIOS, default=list(SCENARIOS))
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    redis_url = bench_redis_url()
    figures: list[Figure] = []
    samples: dict[str, list[float]] = {}
    started = time.monotonic()
    tuned = tuned_settings()
    if tuned:
        print("settings from the environment: " + " ".join(f"{k}={v}" for k, v in tuned.items()))
    with fresh_database() as database_url:
        if "api" in args.only:
            figures += api_cost.measure(
                database_url,
                redis_url,
                workdir,
                connections=plan.connections,
                duration=plan.http_seconds,
                repeats=plan.repeats,
            )
            if not args.quick:  # two more server start-ups: the full run only
                figures += api_cost.measure_broker_down(database_url, workdir, duration=plan.http_seconds)
        if "throughput" in args.only:
            figures += relay_scenarios.relay_throughput(
                database_url,
                redis_url,
                workdir,
                rows=plan.backlog,
                baseline_rows=plan.baseline_backlog,
                repeats=plan.repeats,
            )
        if "latency" in args.only:
            found, samples = relay_scenarios.latency(
                database_url, redis_url, workdir, rates=plan.rates, duration=plan.latency_seconds, repeats=plan.repeats
            )
            figures += found
        if "memory" in args.only:
            small, large = plan.memory_backlogs
            figures += relay_scenarios.relay_memory(
                database_url, redis_url, workdir, small=small, large=large, repeats=plan.repeats
            )
        if "backoff" in args.only:
            figures += relay_scenarios.relay_cpu_in_backoff(
                database_url,
                redis_url,
                workdir,
                rows=plan.backoff_rows,
                seconds=plan.backoff_seconds,
                repeats=plan.repeats,
                broker_up=not args.quick,
            )
        if "worker" in args.only:
            figures += relay_scenarios.worker_capacity(
                database_url, redis_url, workdir, transfers=plan.capacity_transfers, repeats=plan.repeats
            )
        if "worker-cost" in args.only:
            figures += worker_cost.measure(
                database_url, redis_url, workdir, tasks=plan.worker_cost_tasks, repeats=plan.repeats
            )
        if "capacity" in args.only:
            figures += capacity.measure(
                database_url,
                redis_url,
                workdir,
                rates=plan.capacity_rates,
                seconds=plan.capacity_seconds,
                configurations=plan.capacity_configurations,
            )
    checks = targets(figures, plan.memory_backlogs)
    print_table(figures, checks)
    capacity.print_steps(figures)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    document = {
        "when": stamp,
        "quick": args.quick,
        "elapsed_s": time.monotonic() - started,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
        "settings": tuned,
        "figures": [figure.as_dict() for figure in figures],
        "targets": [check.as_dict() for check in checks],
    }
    output = results_dir / f"bench-{stamp}.json"
    output.write_text(json.dumps(document, indent=2, default=str))
    (results_dir / "latest.json").write_text(json.dumps(document, indent=2, default=str))
    if samples:
        chart(samples, results_dir / f"latency-{stamp}.png")
    print(f"\nwrote {output.relative_to(ROOT)} (logs in {workdir})")


if __name__ == "__main__":
    main()
