"""Scenario 1: what the outbox costs the API, against no side effect and in-request .delay(); and what
authentication (key lookup, cached, and the per-client rate limit in Redis) costs it, against the very
same transfer without authentication.

Every variant but `noauth` gets the bench client's key; the load generator sends it to all of them
(the same bytes on the wire), and RATE_LIMIT is set far above what the machine can reach, so the
limiter is counted on every request but never refuses one."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from bench.environment import free_port, process, python, service_env
from bench.stats import Figure
from core.clients import key_hash, new_api_key

VARIANTS = ("plain", "outbox", "naive", "noauth", "unobserved", "minimal")
# The variant without metrics and tracing: the same app as `outbox`, observation off by the environment.
UNOBSERVED_ENV = {"API_METRICS_PORT": "0", "OTEL_SDK_DISABLED": "true"}
# Counted on every request, never reached: the bench measures the limiter's cost, not its refusals.
RATE_LIMIT = "100000000/second"
# Connections per API process. The variants run side by side, so their pools together must stay under
# PostgreSQL's max_connections (100 by default): six pools of 24 were refused connections ("too many
# clients") at 64 clients, which halved the later variants' figures.
POOL_SIZE = 12


@dataclass(frozen=True)
class Seeded:
    client_id: str
    api_key: str
    accounts: list[str]


async def _seed_accounts(database_url: str, count: int) -> Seeded:
    """One client owning `count` accounts, each funded by a deposit (so the books balance)."""
    api_key = new_api_key()
    connection = await asyncpg.connect(database_url)
    try:
        async with connection.transaction():
            client_id = await connection.fetchval(
                "INSERT INTO clients (id, name, key_hash) VALUES (gen_random_uuid(), 'bench', $1) RETURNING id",
                key_hash(api_key),
            )
            rows = await connection.fetch(
                "INSERT INTO accounts (id, client_id, owner_email, currency, balance) "
                "SELECT gen_random_uuid(), $2, 'user' || i || '@example.com', 'EUR', 1000000000 "
                "FROM generate_series(1, $1) AS i RETURNING id",
                count,
                client_id,
            )
            await connection.execute(
                "INSERT INTO transactions (id, kind, from_account_id, to_account_id, amount, currency, status) "
                "SELECT gen_random_uuid(), 'deposit', NULL, id, balance, currency, 'SUCCESS' FROM accounts "
                "WHERE client_id = $1",
                client_id,
            )
    finally:
        await connection.close()
    return Seeded(str(client_id), api_key, [str(row["id"]) for row in rows])


def write_bodies(database_url: str, path: Path, accounts: int = 2000, bodies: int = 5000) -> Seeded:
    seeded = asyncio.run(_seed_accounts(database_url, accounts))
    rng = random.Random(1)
    with path.open("w") as handle:
        for _ in range(bodies):
            source, target = rng.sample(seeded.accounts, 2)
            handle.write(json.dumps({"from_account_id": source, "to_account_id": target, "amount": "1.00"}) + "\n")
    return seeded


def load(
    port: int, bodies: Path, connections: int, duration: float, timeout: float = 10.0, api_key: str | None = None
) -> dict[str, float]:
    """Run the load generator in its own process and return its figures."""
    auth = ["--header", f"Authorization: Bearer {api_key}"] if api_key else []
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
            *auth,
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
    bodies = workdir / "bodies.jsonl"
    seeded = write_bodies(database_url, bodies)
    figures: dict[tuple[str, int, str], Figure] = {}
    with ExitStack() as stack:
        ports = {}
        for variant in VARIANTS:
            ports[variant] = free_port()
            env = service_env(
                database_url,
                redis_url,
                BENCH_VARIANT=variant,
                BENCH_CLIENT_ID=seeded.client_id,
                DB_POOL_SIZE=str(POOL_SIZE),
                DB_MAX_OVERFLOW="0",
                RATE_LIMIT=RATE_LIMIT,
                **(UNOBSERVED_ENV if variant == "unobserved" else _metrics_port()),
            )
            stack.enter_context(
                process(_uvicorn(ports[variant]), env, port=ports[variant], log=workdir / f"api-{variant}.log")
            )
        for variant in VARIANTS:  # warm-up: connections, plan caches, the key cache
            load(ports[variant], bodies, 8, min(duration, 1.0), api_key=seeded.api_key)
        for _ in range(repeats):
            # Interleave the variants so drift on a shared machine hits them all alike.
            for clients in connections:
                for variant in VARIANTS:
                    result = load(ports[variant], bodies, clients, duration, api_key=seeded.api_key)
                    for metric, unit in (("rps", "req/s"), ("p50_ms", "ms"), ("p99_ms", "ms")):
                        key = (variant, clients, metric)
                        figure = figures.setdefault(key, Figure("api", f"{variant} c={clients} {metric}", unit))
                        figure.values.append(result[metric])
                        figure.extra.setdefault("errors", []).append(result["errors"])
    return list(figures.values())


def measure_broker_down(database_url: str, workdir: Path, *, duration: float) -> list[Figure]:
    """(a) and (c) with the broker unreachable: the outbox keeps serving, the naive design fails."""
    bodies = workdir / "bodies.jsonl"
    seeded = write_bodies(database_url, bodies)
    api_key = seeded.api_key
    dead_broker = f"redis://127.0.0.1:{free_port()}/0"
    figures = []
    for variant in ("outbox", "naive"):
        port = free_port()
        env = service_env(
            database_url,
            dead_broker,
            BENCH_VARIANT=variant,
            DB_POOL_SIZE="32",
            RATE_LIMIT=RATE_LIMIT,
            **_metrics_port(),
        )
        with process(_uvicorn(port), env, port=port, log=workdir / f"api-{variant}-broker-down.log"):
            result = load(port, bodies, 16, duration, timeout=5.0, api_key=api_key)
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
