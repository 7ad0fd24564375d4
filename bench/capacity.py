"""Sustained capacity of the whole pipeline: API, relay and worker(s) as `make run` starts them.

Transfers are offered over HTTP at a steady rate, stepped up. A step is sustained when, a settle
time after its load stopped, at most 1% of its transfers still have a task not completed, and
p99 commit->completed, less the task's own simulated delay, stays under 2 s (with the seed's
delays a transfer's email alone takes 2 s, so the bound applies to what the pipeline adds).
The capacity is the highest sustained step; the steps stop at the first one that is not.
The naive design (.delay() inside the request, the same worker) is measured the same way.
"""

from __future__ import annotations

import asyncio
import json
import resource
import statistics
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psutil

from bench.api_cost import RATE_LIMIT, write_bodies
from bench.backlog import on_database
from bench.environment import free_port, process, python, service_env
from bench.loadgen import percentile
from bench.stats import Figure
from core.outbox import queries
from core.outbox.states import OutboxState

SUSTAINED_BACKLOG = 0.01  # of the step's offered transfers
SUSTAINED_P99_S = 2.0  # commit->completed, less the task's own delay
SETTLE_S = 5.0


@dataclass(frozen=True)
class Delays:
    email: float
    audit: float

    @property
    def label(self) -> str:
        return "zero delays" if not (self.email or self.audit) else f"delays {self.email:g}s/{self.audit:g}s"


ZERO = Delays(0.0, 0.0)
SEED = Delays(2.0, 1.0)


@dataclass(frozen=True)
class Step:
    rate: int
    offered: int
    accepted: int
    behind: int  # accepted transfers with a task not completed SETTLE_S after the load
    completed_per_s: float  # transfers completed per second of load
    p50_s: float  # commit->completed, less the task's own delay
    p99_s: float
    worker_rss_mib: float
    worker_idle_rss_mib: float  # before the first step
    in_flight: float  # tasks waiting at once at this rate, by Little's law: rate x the tasks' delays
    refused: dict[str, int]  # answers other than 201, by status (or transport error)
    cpu_ms_per_transfer: dict[str, float]  # by part (CPU_PARTS), load and settle together

    @property
    def kib_per_task_in_flight(self) -> float | None:
        """The workers' memory growth over idle, per task in flight (None with zero delays)."""
        if not self.in_flight:
            return None
        return max(self.worker_rss_mib - self.worker_idle_rss_mib, 0.0) * 1024 / self.in_flight

    @property
    def sustained(self) -> bool:
        return (
            self.accepted >= self.offered * (1 - SUSTAINED_BACKLOG)
            and self.behind <= self.offered * SUSTAINED_BACKLOG
            and self.p99_s < SUSTAINED_P99_S
        )


def _uvicorn(port: int, app: str) -> list[str]:
    return python("-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port), "--no-access-log")


# Where a step's CPU goes, so that the table shows which part a failed step ran out of. The
# database and the broker are the machine's servers: the bench runs with nothing else on them.
CPU_PARTS = ("worker", "relay", "api", "postgres", "redis", "loadgen")


@dataclass(frozen=True)
class Pipeline:
    port: int  # the API's
    workers: list[psutil.Process]
    relay: list[psutil.Process]  # empty for the naive design
    api: list[psutil.Process]

    def parts(self) -> dict[str, list[psutil.Process]]:
        """The processes of each CPU part but the load generator (a child of this process)."""
        servers: dict[str, list[psutil.Process]] = {"postgres": [], "redis": []}
        for candidate in psutil.process_iter(["name"]):
            name = candidate.info["name"] or ""
            for server in servers:
                if name.startswith(server):
                    servers[server].append(candidate)
        return {"worker": self.workers, "relay": self.relay, "api": self.api, **servers}


def _cpu_seconds(processes: list[psutil.Process]) -> dict[int, float]:
    """Each process's CPU seconds so far, by pid; a server's backend that has gone is left out."""
    spent: dict[int, float] = {}
    for p in processes:
        with suppress(psutil.Error):
            times = p.cpu_times()
            spent[p.pid] = times.user + times.system
    return spent


def _spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two readings, over the processes in both (one that exited between them
    would otherwise count its whole life as negative)."""
    return sum(after[pid] - before[pid] for pid in before.keys() & after.keys())


def _children_cpu_seconds() -> float:
    """CPU of this process's exited children: the load generator, once subprocess.run reaped it."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@contextmanager
def _cpu_by_part(pipeline: Pipeline) -> Iterator[dict[str, float]]:
    """CPU seconds of each part (CPU_PARTS) while the block runs, filled in when it ends."""
    parts = pipeline.parts()
    before = {name: _cpu_seconds(processes) for name, processes in parts.items()}
    children = _children_cpu_seconds()
    spent: dict[str, float] = {}
    yield spent
    spent.update({name: _spent(before[name], _cpu_seconds(processes)) for name, processes in parts.items()})
    spent["loadgen"] = _children_cpu_seconds() - children


@contextmanager
def pipeline(
    database_url: str, redis_url: str, workdir: Path, *, workers: int, delays: Delays, naive: bool
) -> Iterator[Pipeline]:
    """The API, the relay (not for the naive design) and `workers` worker processes, as `make run`
    starts them, on a queue of their own."""
    queue = f"capacity-{uuid.uuid4().hex[:8]}"
    env = service_env(
        database_url,
        redis_url,
        CELERY_TASK_QUEUE=queue,
        BENCH_NAIVE_QUEUE=queue,
        BENCH_VARIANT="naive" if naive else "outbox",
        EMAIL_SEND_DELAY=str(delays.email),
        AUDIT_WRITE_DELAY=str(delays.audit),
        API_METRICS_PORT=str(free_port()),  # measured as in production, on a port no other run holds
        RATE_LIMIT=RATE_LIMIT,  # one bench client offers every transfer: counted, never refused
    )
    port = free_port()
    with ExitStack() as stack:
        tag = f"{'naive' if naive else 'outbox'}-{workers}w-{delays.email:g}"
        started = [
            stack.enter_context(
                process(
                    python("-m", "celery", "-A", "worker.celery_app", "worker", "--loglevel=warning", f"-n=cap{i}@%h"),
                    env,
                    log=workdir / f"capacity-worker{i}-{tag}.log",
                )
            )
            for i in range(workers)
        ]
        relay = []
        if not naive:
            log = workdir / f"capacity-relay-{tag}.log"
            relay.append(stack.enter_context(process(python("-m", "relay"), env, log=log)))
        app = "bench.variants:app" if naive else "api.main:app"
        log = workdir / f"capacity-api-{tag}.log"
        api = stack.enter_context(process(_uvicorn(port, app), env, port=port, log=log))
        time.sleep(3)  # the workers connect to the broker
        yield Pipeline(
            port,
            [psutil.Process(p.pid) for p in started],
            [psutil.Process(p.pid) for p in relay],
            [psutil.Process(api.pid)],
        )


def _offer(port: int, bodies: Path, api_key: str, rate: int, seconds: float) -> list[dict[str, object]]:
    output = subprocess.run(
        python(
            "-m",
            "bench.steady_load",
            "--port",
            str(port),
            "--bodies",
            str(bodies),
            "--header",
            f"Authorization: Bearer {api_key}",
            "--rate",
            str(rate),
            "--duration",
            str(seconds),
        ),
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [json.loads(line) for line in output.splitlines()]


async def _outbox_lags(database_url: str, ids: list[uuid.UUID], delays: Delays) -> tuple[int, list[float]]:
    """(transfers with a row not completed, lag of each completed row less its task's delay)."""
    rows = await on_database(database_url, queries.timings_of_transactions, ids)
    own = {"send_transaction_email": delays.email, "audit_log_transaction": delays.audit}
    lags: list[float] = []
    unfinished: set[uuid.UUID | None] = set()
    for row in rows:
        if row.state != OutboxState.COMPLETED or row.completed_at is None:
            unfinished.add(row.transaction_id)
            continue
        lags.append((row.completed_at - row.created_at).total_seconds() - own.get(row.task_name, 0.0))
    return len(unfinished), lags


# The naive design has no outbox: its completion shows in the audit rows its tasks write
# (a baseline's own SQL, on a table that is not the outbox's).
_NAIVE_AUDITED = """
SELECT t.id, extract(epoch FROM a.created_at - t.created_at) AS lag
FROM transactions t LEFT JOIN audit_log a ON a.transaction_id = t.id::text
WHERE t.id = ANY($1::uuid[])
"""


async def _naive_lags(database_url: str, ids: list[uuid.UUID], delays: Delays) -> tuple[int, list[float]]:
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch(_NAIVE_AUDITED, ids)
    finally:
        await connection.close()
    lags = [float(r["lag"]) - delays.audit for r in rows if r["lag"] is not None]
    return sum(1 for r in rows if r["lag"] is None), lags


def _rss(workers: list[psutil.Process]) -> float:
    """The workers' summed RSS, bytes."""
    return float(sum(w.memory_full_info().rss for w in workers))


@contextmanager
def _peak_rss(workers: list[psutil.Process]) -> Iterator[list[float]]:
    """The workers' largest summed RSS (bytes) while the block runs, sampled every 0.2 s."""
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            with suppress(psutil.Error):
                peak[0] = max(peak[0], _rss(workers))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()


def step(
    database_url: str,
    running: Pipeline,
    bodies: Path,
    api_key: str,
    *,
    rate: int,
    seconds: float,
    delays: Delays,
    naive: bool,
    idle_rss: float,
) -> Step:
    with _cpu_by_part(running) as cpu:
        with _peak_rss(running.workers) as peak:
            answers = _offer(running.port, bodies, api_key, rate, seconds)
        ids = [uuid.UUID(str(a["id"])) for a in answers if a["status"] == 201 and a["id"]]
        lags_of = _naive_lags if naive else _outbox_lags
        deadline = time.monotonic() + SETTLE_S + max(delays.email, delays.audit)
        behind, lags = asyncio.run(lags_of(database_url, ids, delays))
        while behind and time.monotonic() < deadline:
            time.sleep(0.5)
            behind, lags = asyncio.run(lags_of(database_url, ids, delays))
    lags.sort()
    return Step(
        rate=rate,
        offered=len(answers),
        accepted=len(ids),
        behind=behind,
        completed_per_s=(len(ids) - behind) / seconds,
        p50_s=percentile(lags, 0.5),
        p99_s=percentile(lags, 0.99),
        worker_rss_mib=peak[0] / 2**20,
        worker_idle_rss_mib=idle_rss / 2**20,
        in_flight=rate * (delays.email + delays.audit),
        refused=dict(Counter(str(a["status"]) for a in answers if a["status"] != 201)),
        cpu_ms_per_transfer={name: 1000 * cpu[name] / max(len(ids), 1) for name in CPU_PARTS},
    )


def measure(
    database_url: str,
    redis_url: str,
    workdir: Path,
    *,
    rates: list[int],
    seconds: float,
    configurations: list[tuple[Delays, int, bool]],
) -> list[Figure]:
    """One figure row per step and configuration, and the sustained capacity of each."""
    bodies = workdir / "capacity-bodies.jsonl"
    seeded = write_bodies(database_url, bodies, bodies=20_000)
    figures: list[Figure] = []
    for delays, workers, naive in configurations:
        name = f"{'naive' if naive else 'outbox'}, {workers} worker{'s' * (workers > 1)}, {delays.label}"
        capacity = 0
        with pipeline(database_url, redis_url, workdir, workers=workers, delays=delays, naive=naive) as running:
            idle_rss = _rss(running.workers)
            for rate in rates:
                result = step(
                    database_url,
                    running,
                    bodies,
                    seeded.api_key,
                    rate=rate,
                    seconds=seconds,
                    delays=delays,
                    naive=naive,
                    idle_rss=idle_rss,
                )
                figures.append(
                    Figure(
                        "capacity",
                        f"{name} @{rate}/s",
                        "transfers/s",
                        [result.completed_per_s],
                        {
                            **result.__dict__,
                            "sustained": result.sustained,
                            "kib_per_task_in_flight": result.kib_per_task_in_flight,
                        },
                    )
                )
                if not result.sustained:
                    break
                capacity = rate
        figures.append(Figure("capacity", f"{name}: sustained", "transfers/s", [capacity]))
    return figures


def print_steps(figures: list[Figure]) -> None:
    """The capacity table: each step's completed rate, backlog and latency."""
    rows = [f for f in figures if f.scenario == "capacity" and "rate" in f.extra]
    if not rows:
        return
    header = f"{'capacity step':<52} {'done/s':>7} {'behind':>7} {'p50 s':>7} {'p99 s':>7} {'RSS MiB':>8}"
    print(f"\n{header} {'KiB/in flight':>13} ok")
    for f in rows:
        e = f.extra
        per_task = e.get("kib_per_task_in_flight")
        print(
            f"{f.name:<52} {e['completed_per_s']:>7.1f} {e['behind']:>7} {e['p50_s']:>7.3f} {e['p99_s']:>7.3f}"
            f" {e['worker_rss_mib']:>8.1f} {'-' if per_task is None else f'{per_task:.0f}':>13}"
            f" {'yes' if e['sustained'] else 'NO'}"
        )
    for f in figures:
        if f.name.endswith(": sustained"):
            print(f"{f.name:<52} {statistics.median(f.values):>7.0f}")
    print(f"\n{'CPU per transfer, ms (load and settle)':<52}" + "".join(f" {part:>8}" for part in (*CPU_PARTS, "all")))
    for f in rows:
        spent = f.extra.get("cpu_ms_per_transfer") or {}
        cells = [spent.get(part, 0.0) for part in CPU_PARTS]
        print(f"{f.name:<52}" + "".join(f" {cell:>8.2f}" for cell in (*cells, sum(cells))))
