"""Real Celery worker processes for the tests: started, waited for, and always killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from core.settings import Settings
from tests.support.environment import ROOT, service_env
from tests.support.waiting import wait_until
from worker.celery_app import WorkerApp, create_celery_app

CELERY = str(Path(sys.executable).with_name("celery"))


@dataclass
class RunningWorker:
    """A `celery -A worker.celery_app worker` process, leader of its own process group."""

    process: subprocess.Popen[bytes]
    hostname: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        """Everything the worker has written to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to the worker and all its children (prefork pool processes)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)

    def wait_for_log(self, text: str, *, timeout: float = 30.0, count: int = 1) -> None:
        """Wait until `text` occurs `count` times in the log. Raises AssertionError with the log's end."""

        def seen() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            return self.log().count(text) >= count

        try:
            wait_until(seen, timeout, f"{text!r} {count}x in the worker's log")
        except AssertionError as error:
            raise AssertionError(f"{error}:\n{self.log()[-4000:]}") from None


@contextmanager
def start_worker(
    env: dict[str, str],
    *,
    queue: str,
    pool: str = "asyncio",
    concurrency: int = 4,
    ready_timeout: float = 30.0,
    log_dir: Path | None = None,
) -> Iterator[RunningWorker]:
    """Start a real worker consuming `queue` with `env` (see tests.support.environment.service_env).

    Yields once the worker logs that it is ready; on exit, stops it (SIGTERM, then SIGKILL
    after 5 s) whatever happened. Mingle and gossip are off: they only slow start-up.
    """
    hostname = f"test-{uuid.uuid4().hex[:8]}@tests"
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="celery-worker-"))
    log_path = log_dir / f"{hostname.split('@')[0]}.log"
    worker_env = {**env, "CELERY_TASK_QUEUE": queue, "CELERY_WORKER_POOL": pool}
    if pool == "asyncio":  # the default; Celery's CLI reads CELERY_WORKER_POOL too and knows only its own
        del worker_env["CELERY_WORKER_POOL"]
    worker_env["CELERY_WORKER_CONCURRENCY"] = str(concurrency)
    command = [
        CELERY,
        "-A",
        "worker.celery_app",
        "worker",
        "--loglevel=info",
        f"--hostname={hostname}",
        f"--queues={queue}",
        *([] if pool == "asyncio" else [f"--pool={pool}"]),
        f"--concurrency={concurrency}",
        "--without-mingle",
        "--without-gossip",
    ]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command, cwd=ROOT, env=worker_env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    worker = RunningWorker(process, hostname, log_path)
    try:
        worker.wait_for_log(f"{worker.hostname} ready.", timeout=ready_timeout)
        yield worker
    finally:
        _stop(worker)


def _stop(worker: RunningWorker) -> None:
    if worker.process.poll() is None:
        # Warm shutdown: SIGTERM to the main process only; it lets its pool children finish
        # and acknowledge (SIGTERM to the whole group would kill the children mid-task).
        worker.process.terminate()
        try:
            worker.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            worker.kill(signal.SIGKILL)
            worker.process.wait(timeout=5)
    # Pool children of a killed prefork worker may outlive their parent for a moment.
    with suppress(ProcessLookupError):
        os.killpg(worker.process.pid, signal.SIGKILL)


def worker_settings(database_url: str, redis_url: str, **overrides: Any) -> Settings:
    """Settings for the test servers with the tasks' delays off, like the `settings` fixture,
    but buildable at module scope; `overrides` are Settings fields."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "celery_broker_url_override": redis_url,
        "celery_result_backend_override": redis_url,
        "email_send_delay": 0,
        "audit_write_delay": 0,
        "log_json": False,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment for a worker that uses `settings`: servers, delays, limits and SMTP."""
    env = service_env(
        settings,
        CELERY_TASK_QUEUE=settings.celery_task_queue,
        CELERY_TASK_TIME_LIMIT=str(settings.celery_task_time_limit),
        CELERY_TASK_SOFT_TIME_LIMIT=str(settings.celery_task_soft_time_limit),
        CELERY_VISIBILITY_TIMEOUT=str(settings.celery_visibility_timeout),
        CELERY_RETRY_BACKOFF_MAX=str(settings.celery_retry_backoff_max),
        CELERY_TASK_MAX_RETRIES=str(settings.celery_task_max_retries),
        SMTP_PORT=str(settings.smtp_port),
        SMTP_TIMEOUT=str(settings.smtp_timeout),
    )
    env.pop("SMTP_HOST", None)
    if settings.smtp_host:
        env["SMTP_HOST"] = settings.smtp_host
    env.update(extra)
    return env


@contextmanager
def mail_worker(
    database_url: str,
    redis_url: str,
    *,
    smtp_host: str,
    smtp_port: int,
    env: dict[str, str] | None = None,
    **overrides: Any,
) -> Iterator[tuple[WorkerApp, RunningWorker]]:
    """A real worker on a queue of its own that sends to the SMTP server at smtp_host:smtp_port,
    with a client app to send it tasks; `overrides` are Settings fields, `env` extra variables."""
    queue = f"test-mail-{uuid.uuid4().hex[:8]}"
    settings = worker_settings(
        database_url, redis_url, celery_task_queue=queue, smtp_host=smtp_host, smtp_port=smtp_port, **overrides
    )
    client = create_celery_app(settings)
    try:
        with start_worker(worker_env(settings, **(env or {})), queue=queue) as worker:
            yield client, worker
    finally:
        client.close()


def task_result(redis_url: str, task_id: str) -> dict[str, Any] | None:
    """The result Celery stored for `task_id` in the Redis result backend, or None."""
    client = redis.Redis.from_url(redis_url)
    try:
        raw = client.get(f"celery-task-meta-{task_id}")
    finally:
        client.close()
    return json.loads(raw) if raw else None
