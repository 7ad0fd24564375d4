"""Scenario 1: what the outbox costs the API, against no side effect and in-request .delay()."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
from contextlib import ExitStack
from pathlib import Path

import asyncpg

from bench.environment import free_port, process, python, service_env
from bench.stats import Figure

VARIANTS = ("plain", "outbox", "naive")


async def _seed_accounts(database_url: str, count: int) -> list[str]:
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch(
            "INSERT INTO accounts (id, owner_email, currency, balance) "
            "SELECT gen_random_uuid(), 'user' || i || '@example.com', 'EUR', 1000000000 "
            "FROM generate_series(1, $1) AS i RETURNING id",
            count,
        )
    finally:
        await connection.close()
    return [str(row["id"]) for row in rows]


def write_bodies(database_url: str, path: Path, accounts: int = 2000, bodies: int = 5000) -> Path:
    ids = asyncio.run(_seed_accounts(database_url, accounts))
    rng = random.Random(1)
    with path.open("w") as handle:
        for _ in range(bodies):
            source, target = rng.sample(ids, 2)
            handle.write(json.dumps({"from_account_id": source, "to_account_id": target, "amount": "1.00"}) + "\n")
    return path


def load(port: int, bodies: Path, connections: int, duration: float, timeout: float = 10.0) -> dict[str, float]:
    """Run the load generator in its own process and return its figures."""
    output = subprocess.run(
        python(
            "-m",
            "bench.loadgen",
            "--port",
            str(port),
            "--bodies",
            str(bodies),
            "--connections",
            str(connections),
            "--duration",
            str(duration),
            "--timeout",
            str(timeout),
        ),
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, float] = json.loads(output)
    return result


def _metrics_port() -> dict[str, str]:
    """Each API process measures itself as in production, on a /metrics port of its own."""
    return {"API_METRICS_PORT": str(free_port())}


def _uvicorn(port: int) -> list[str]:
    return python(
        "-m",
        "uvicorn",
        "bench.variants:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--log-level",
        "warning",
    )


def measure(
    database_url: str, redis_url: str, workdir: Path, *, connections: list[int], duration: float, repeats: int
) -> list[Figure]:
    bodies = write_bodies(database_url, workdir / "bodies.jsonl")
    figures: dict[tuple[str, int, str], Figure] = {}
    with ExitStack() as stack:
        ports = {}
        for variant in VARIANTS:
            ports[variant] = free_port()
            sizes = {"DB_POOL_SIZE": "24", "DB_MAX_OVERFLOW": "0"}
            env = service_env(database_url, redis_url, BENCH_VARIANT=variant, **sizes, **_metrics_port())
            stack.enter_context(
                process(_uvicorn(ports[variant]), env, port=ports[variant], log=workdir / f"api-{variant}.log")
            )
        for variant in VARIANTS:
            load(ports[variant], bodies, 8, min(duration, 1.0))  # warm-up: connections, plan caches
        for _ in range(repeats):
            # Interleave the variants so drift on a shared machine hits them all alike.
            for clients in connections:
                for variant in VARIANTS:
                    result = load(ports[variant], bodies, clients, duration)
                    for metric, unit in (("rps", "req/s"), ("p50_ms", "ms"), ("p99_ms", "ms")):
                        key = (variant, clients, metric)
                        figure = figures.setdefault(key, Figure("api", f"{variant} c={clients} {metric}", unit))
                        figure.values.append(result[metric])
                        figure.extra.setdefault("errors", []).append(result["errors"])
    return list(figures.values())


def measure_broker_down(database_url: str, workdir: Path, *, duration: float) -> list[Figure]:
    """(a) and (c) with the broker unreachable: the outbox keeps serving, the naive design fails."""
    bodies = workdir / "bodies.jsonl"
    dead_broker = f"redis://127.0.0.1:{free_port()}/0"
    figures = []
    for variant in ("outbox", "naive"):
        port = free_port()
        env = service_env(database_url, dead_broker, BENCH_VARIANT=variant, DB_POOL_SIZE="32", **_metrics_port())
        with process(_uvicorn(port), env, port=port, log=workdir / f"api-{variant}-broker-down.log"):
            result = load(port, bodies, 16, duration, timeout=5.0)
        figures.append(
            Figure(
                "api-broker-down",
                f"{variant} c=16 rps",
                "req/s",
                [result["rps"]],
                {"errors": result["errors"], "statuses": result["statuses"], "p50_ms": result["p50_ms"]},
            )
        )
    return figures
