"""Scenarios 2-4: relay drain rate, commit-to-broker/-task latency, and memory under a backlog."""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import psutil
import redis

from bench.backlog import count_by_state, fill_backlog, on_database
from bench.environment import free_port, process, python, service_env
from bench.loadgen import percentile
from bench.stats import Figure
from core.outbox import queries
from core.outbox.states import OutboxState

QUEUE = "bench"


def _env(database_url: str, redis_url: str, **extra: str) -> dict[str, str]:
    # INFO, as in production: the worker's readiness and the relay's batch lines are INFO logs.
    return service_env(database_url, redis_url, CELERY_TASK_QUEUE=QUEUE, **{"LOG_LEVEL": "INFO", **extra})


def relay_command() -> list[str]:
    return python("-m", "relay")


def worker_command(concurrency: int | None = None) -> list[str]:
    args = python(
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "--loglevel=info",
        "-Q",
        QUEUE,
        "--without-mingle",
        "--without-gossip",
    )
    if concurrency is not None:
        args.append(f"--concurrency={concurrency}")
    return args


def clear_queue(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.delete(QUEUE)
    client.close()


async def _publish_window(database_url: str) -> tuple[int, float]:
    return await on_database(database_url, queries.publish_window)


def _wait_drained(database_url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if asyncio.run(count_by_state(database_url)).get("pending", 0) == 0:
            return
        time.sleep(0.2)
    raise TimeoutError(f"backlog not drained within {timeout}s")


def _wait_for_log(path: Path, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{text!r} not in {path} after {timeout}s")


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def drain(
    database_url: str, redis_url: str, workdir: Path, rows: int, command: list[str], copies: int, *, label: str
) -> tuple[float, list[float]]:
    """Drain a committed backlog of `rows` with `copies` publisher processes.

    Returns (events/s between the first and the last publish, peak RSS MiB per process).
    """
    asyncio.run(fill_backlog(database_url, 0))
    clear_queue(redis_url)
    with ExitStack() as stack:
        children = [
            stack.enter_context(process(command, _env(database_url, redis_url), log=workdir / f"{label}-{i}.log"))
            for i in range(copies)
        ]
        time.sleep(1.5)  # let them start and go idle, so the drain is timed, not the start-up
        asyncio.run(fill_backlog(database_url, rows))
        _wait_drained(database_url, timeout=max(120.0, rows / 1000))
        peaks = [_peak_rss_mib(child.pid) for child in children]
    published, span = asyncio.run(_publish_window(database_url))
    clear_queue(redis_url)
    if published < rows:
        raise RuntimeError(f"{label}: only {published} of {rows} rows published")
    return rows / span if span else float("inf"), peaks


def relay_throughput(
    database_url: str, redis_url: str, workdir: Path, *, rows: int, baseline_rows: int, repeats: int
) -> list[Figure]:
    one = Figure("relay-throughput", "relay x1 events/s", "events/s")
    two = Figure("relay-throughput", "relay x2 events/s", "events/s")
    base = Figure("relay-throughput", "send_task loop events/s", "events/s")
    baseline = python("-m", "bench.baseline_relay", "--poll-interval", "0.05")
    for _ in range(repeats):
        one.values.append(drain(database_url, redis_url, workdir, rows, relay_command(), 1, label="relay1")[0])
        two.values.append(drain(database_url, redis_url, workdir, rows, relay_command(), 2, label="relay2")[0])
        base.values.append(drain(database_url, redis_url, workdir, baseline_rows, baseline, 1, label="baseline")[0])
    return [one, two, base]


def relay_memory(
    database_url: str, redis_url: str, workdir: Path, *, small: int, large: int, repeats: int
) -> list[Figure]:
    figures = [Figure("relay-memory", f"peak RSS, {n:,} backlog", "MiB") for n in (small, large)]
    for _ in range(repeats):
        for figure, rows in zip(figures, (small, large), strict=True):
            figure.values.append(
                drain(database_url, redis_url, workdir, rows, relay_command(), 1, label="memory")[1][0]
            )
    return figures


async def _latencies(database_url: str, records: list[dict[str, object]]) -> tuple[list[float], list[float]]:
    committed = {}
    for record in records:
        for outbox_id in record["ids"]:  # type: ignore[attr-defined]
            committed[outbox_id] = float(record["committed"])  # type: ignore[arg-type]
    rows = await on_database(database_url, queries.timings, [uuid.UUID(i) for i in committed])
    to_broker = sorted(
        1000 * (r.published_at.timestamp() - committed[str(r.id)]) for r in rows if r.published_at is not None
    )
    to_task = sorted(1000 * (r.started_at.timestamp() - committed[str(r.id)]) for r in rows if r.started_at is not None)
    return to_broker, to_task


def _wait_started(database_url: str, expected: int, timeout: float) -> None:
    async def started() -> int:
        return await on_database(database_url, queries.run_count)

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and asyncio.run(started()) < expected:
        time.sleep(0.5)


def latency_run(
    database_url: str, redis_url: str, workdir: Path, rate: int, duration: float, publisher: list[str], label: str
) -> tuple[list[float], list[float]]:
    asyncio.run(fill_backlog(database_url, 0))
    clear_queue(redis_url)
    env = _env(database_url, redis_url, EMAIL_SEND_DELAY="0", AUDIT_WRITE_DELAY="0")
    with ExitStack() as stack:
        stack.enter_context(process(publisher, env, log=workdir / f"{label}.log"))
        stack.enter_context(process(worker_command(), env, log=workdir / f"{label}-worker.log"))
        _wait_for_log(workdir / f"{label}-worker.log", "ready.")
        # Rows committed before the publisher listens would measure its start-up, not its latency.
        if publisher == relay_command():
            _wait_for_log(workdir / f"{label}.log", "relay.connected")
        else:
            time.sleep(1.5)
        output = subprocess.run(
            python("-m", "bench.writer", "--rate", str(rate), "--duration", str(duration)),
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        records = [json.loads(line) for line in output.splitlines()]
        # Bounded: above what one worker process sustains, the queue (and this wait) grows.
        _wait_started(database_url, 2 * len(records), timeout=30)
    clear_queue(redis_url)
    return asyncio.run(_latencies(database_url, records))


def latency(
    database_url: str, redis_url: str, workdir: Path, *, rates: list[int], duration: float, repeats: int
) -> tuple[list[Figure], dict[str, list[float]]]:
    figures: dict[str, Figure] = {}
    samples: dict[str, list[float]] = {}
    poller = python("-m", "bench.baseline_relay", "--poll-interval", "1")
    for _ in range(repeats):
        for rate in rates:
            for label, publisher in (("relay", relay_command()), ("1s poller", poller)):
                to_broker, to_task = latency_run(
                    database_url,
                    redis_url,
                    workdir,
                    rate,
                    duration,
                    publisher,
                    f"latency-{label.replace(' ', '')}-{rate}",
                )
                samples.setdefault(f"{label} {rate}/s commit->broker", []).extend(to_broker)
                for kind, values in (("commit->broker", to_broker), ("commit->task", to_task)):
                    for stat, fraction in (("p50", 0.5), ("p99", 0.99), ("max", 1.0)):
                        name = f"{label} {rate}/s {kind} {stat}"
                        figure = figures.setdefault(name, Figure("latency", name, "ms"))
                        figure.values.append(percentile(values, fraction) if values else float("nan"))
                        figure.extra.setdefault("samples", []).append(len(values))
    return list(figures.values()), samples


def worker_capacity(database_url: str, redis_url: str, workdir: Path, *, transfers: int, repeats: int) -> list[Figure]:
    """Transfers/s one worker process completes with the real default delays (2 s and 1 s)."""
    figure = Figure("worker", "one worker process, default pool, transfers/s", "transfers/s")
    for _ in range(repeats):
        asyncio.run(fill_backlog(database_url, 0))
        clear_queue(redis_url)
        env = _env(database_url, redis_url, EMAIL_SEND_DELAY="2", AUDIT_WRITE_DELAY="1")
        with ExitStack() as stack:
            stack.enter_context(process(relay_command(), env, log=workdir / "capacity-relay.log"))
            stack.enter_context(process(worker_command(), env, log=workdir / "capacity-worker.log"))
            _wait_for_log(workdir / "capacity-worker.log", "ready.")
            started = time.monotonic()
            output = subprocess.run(
                python("-m", "bench.writer", "--rate", "1000", "--duration", str(transfers / 1000)),
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            expected = 2 * len(output.splitlines())
            _wait_completed(database_url, expected, timeout=600)
            elapsed = time.monotonic() - started
        figure.values.append(expected / 2 / elapsed)
        figure.extra.setdefault("elapsed_s", []).append(elapsed)
    clear_queue(redis_url)
    return [figure]


def _wait_completed(database_url: str, expected: int, timeout: float) -> None:
    async def completed() -> int:
        return (await count_by_state(database_url))[OutboxState.COMPLETED]

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if asyncio.run(completed()) >= expected:
            return
        time.sleep(0.5)
    raise TimeoutError(f"worker did not complete {expected} tasks within {timeout}s")


def _cpu_share(pid: int, seconds: float) -> float:
    """The process's CPU time (user + system) over the next `seconds`, in % of one core."""
    measured = psutil.Process(pid)
    cpu, wall = float(sum(measured.cpu_times()[:2])), time.monotonic()
    time.sleep(seconds)
    return 100 * (float(sum(measured.cpu_times()[:2])) - cpu) / (time.monotonic() - wall)


def relay_cpu_in_backoff(
    database_url: str, redis_url: str, workdir: Path, *, rows: int, seconds: float, repeats: int, broker_up: bool
) -> list[Figure]:
    """The relay's CPU while `rows` pending rows wait in backoff: with the broker down (500 more rows
    due, which find it unreachable), and, with `broker_up`, with the broker up (nothing due: only
    the idle polls, whose claims must not read the rows in backoff)."""
    down = Figure("relay-backoff", f"relay CPU, broker down, {rows:,} rows in backoff", "% of one core")
    idle = Figure("relay-backoff", f"relay CPU, broker up, {rows:,} rows in backoff", "% of one core")
    unreachable = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    variants = [(down, unreachable, 500), (idle, redis_url, 0)][: 2 if broker_up else 1]
    for _ in range(repeats):
        for figure, broker, due_now in variants:
            asyncio.run(fill_backlog(database_url, rows, due_in=3600, due_now=due_now))
            clear_queue(redis_url)
            log = workdir / f"backoff-{len(figure.values)}-{'down' if due_now else 'up'}.log"
            with process(relay_command(), _env(database_url, broker), log=log) as relay:
                _wait_for_log(log, "relay.broker_unreachable" if due_now else "relay.connected")
                time.sleep(1)  # past the first probes' short backoff steps
                figure.values.append(_cpu_share(relay.pid, seconds))
            if due_now and asyncio.run(count_by_state(database_url))["dead"]:
                raise RuntimeError("rows died while the broker was down")
    clear_queue(redis_url)
    return [figure for figure, _, _ in variants]


def median_or_nan(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
