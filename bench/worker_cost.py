"""CPU per task of one worker process: the project's two tasks against a no-op task.

Both run in a worker with the same Celery configuration (worker.celery_app.celery_config), on
a queue filled after the worker is ready, with zero simulated delays. The figure is the worker
process's CPU time (user + system, its children included) from the first message to the last
result, divided by the number of tasks: a figure that a loaded machine stretches far less than
it stretches throughput.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import redis
from celery import Celery

from bench.backlog import count_by_state, fill_backlog
from bench.environment import process, python, service_env
from bench.noop_worker import NOOP
from bench.stats import Figure
from core.outbox.states import OutboxState


def _cpu_seconds(pid: int) -> float:
    root = psutil.Process(pid)
    total = 0.0
    for member in [root, *root.children(recursive=True)]:
        times = member.cpu_times()
        total += times.user + times.system
    return total


def _wait_ready(log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while "ready." not in (log.read_text(errors="replace") if log.exists() else ""):
        if time.monotonic() > deadline:
            raise TimeoutError(f"worker not ready within {timeout}s; see {log}")
        time.sleep(0.1)


def _measure(app: str, env: dict[str, str], log: Path, fill: Callable[[], None], done: Callable[[], bool]) -> float:
    """CPU seconds the worker spends between fill() and done()."""
    args = python("-m", "celery", "-A", app, "worker", "--loglevel=info", "--without-mingle", "--without-gossip")
    with process(args, env, log=log) as worker:
        _wait_ready(log)
        time.sleep(1)  # let start-up work settle before the first sample
        before = _cpu_seconds(worker.pid)
        fill()
        deadline = time.monotonic() + 600
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{app}: tasks not done within 600 s; see {log}")
            time.sleep(0.2)
        return _cpu_seconds(worker.pid) - before


def _noop_cpu(redis_url: str, env: dict[str, str], workdir: Path, tasks: int) -> float:
    queue = env["CELERY_TASK_QUEUE"]
    ids = [str(uuid.uuid4()) for _ in range(tasks)]
    client = redis.Redis.from_url(redis_url)

    def fill() -> None:
        sender = Celery(broker=redis_url)
        with sender.producer_or_acquire() as producer:
            for task_id in ids:
                sender.send_task(NOOP, task_id=task_id, queue=queue, producer=producer)

    def done() -> bool:
        pipeline = client.pipeline(transaction=False)
        for task_id in ids:
            pipeline.exists(f"celery-task-meta-{task_id}")
        return all(pipeline.execute())

    try:
        return _measure("bench.noop_worker", env, workdir / "worker-cost-noop.log", fill, done)
    finally:
        client.close()


def _tasks_cpu(database_url: str, env: dict[str, str], workdir: Path, tasks: int) -> float:
    def fill() -> None:
        # The relay publishes what the writer commits: a transfer's two rows, tasks / 2 times.
        subprocess.run(
            python("-m", "bench.writer", "--rate", "2000", "--duration", str(tasks / 2 / 2000)),
            env=env,
            check=True,
            capture_output=True,
        )

    def done() -> bool:
        return asyncio.run(count_by_state(database_url))[OutboxState.COMPLETED] >= tasks

    with process(python("-m", "relay"), env, log=workdir / "worker-cost-relay.log"):
        return _measure("worker.celery_app", env, workdir / "worker-cost-tasks.log", fill, done)


def measure(database_url: str, redis_url: str, workdir: Path, *, tasks: int, repeats: int) -> list[Figure]:
    """The two tasks and the no-op under the default pool (the target's figures), and both again
    under Celery's threads pool, the default before the asyncio pool (worker/pool.py)."""
    figures: list[Figure] = []
    for pool, label in (("", ""), ("threads", ", threads pool")):
        noop = Figure("worker-cost", f"no-op task, same Celery config{label}, CPU per task", "ms")
        ours = Figure("worker-cost", f"the two tasks, zero delays{label}, CPU per task", "ms")
        for _ in range(repeats):
            env = service_env(
                database_url,
                redis_url,
                CELERY_TASK_QUEUE=f"worker-cost-{uuid.uuid4().hex[:8]}",
                EMAIL_SEND_DELAY="0",
                AUDIT_WRITE_DELAY="0",
                LOG_LEVEL="INFO",  # as `make run` logs, and so that the worker says when it is ready
            )
            env.pop("CELERY_WORKER_POOL", None)
            if pool:
                env["CELERY_WORKER_POOL"] = pool
            noop.values.append(1000 * _noop_cpu(redis_url, env, workdir, tasks) / tasks)
            asyncio.run(fill_backlog(database_url, 0))  # an empty outbox
            ours.values.append(1000 * _tasks_cpu(database_url, env, workdir, tasks) / tasks)
        figures += [noop, ours]
    return figures
