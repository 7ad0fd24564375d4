"""Relay processes and a private broker for the relay tests: started, waited for, always stopped."""

from __future__ import annotations

import base64
import json
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
from devservers.embedded import free_port, start_redis
from tests.support.environment import ROOT, service_env

# Short intervals so the relay tests run in seconds.
FAST_RELAY_ENV = {
    "RELAY_POLL_INTERVAL": "0.2",
    "RELAY_BACKOFF_BASE": "0.05",
    "RELAY_BACKOFF_MAX": "0.2",
    "RELAY_PUBLISH_TIMEOUT": "2",
    "RELAY_RECONCILE_INTERVAL": "0.2",
}


@dataclass
class PrivateRedis:
    """A redis-server of our own: no other test's flush or consumer can touch its queues,
    and a test may stop and restart it (same port, same data directory)."""

    data_dir: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        _, self.process = start_redis(self.data_dir, self.port, appendonly=True)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


@contextmanager
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis(Path(tempfile.mkdtemp(prefix="relay-redis-")), free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class RelayProcess:
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)


def relay_env(settings: Settings, broker_url: str, queue: str, **extra: str) -> dict[str, str]:
    """The environment for `python -m relay` on the test database, a broker and a queue."""
    return service_env(settings, CELERY_BROKER_URL=broker_url, CELERY_TASK_QUEUE=queue, **{**FAST_RELAY_ENV, **extra})


@contextmanager
def start_relay(env: dict[str, str]) -> Iterator[RelayProcess]:
    """Run `python -m relay` with env; on exit SIGKILL it if it still runs."""
    log_path = Path(tempfile.mkdtemp(prefix="relay-log-")) / "relay.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "relay"], cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    relay = RelayProcess(process, log_path)
    try:
        yield relay
    finally:
        if process.poll() is None:
            process.kill()
        with suppress(subprocess.TimeoutExpired):
            process.wait(10)


def run_relay_command(env: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`python -m relay ARGS...` to completion, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass(frozen=True)
class BrokerMessage:
    """One task message as a Celery worker would read it from the Redis list."""

    raw: dict[str, Any]

    @property
    def task_id(self) -> str:
        return str(self.raw["headers"]["id"])

    @property
    def task_name(self) -> str:
        return str(self.raw["headers"]["task"])

    @property
    def body(self) -> list[Any]:
        decoded: list[Any] = json.loads(base64.b64decode(self.raw["body"]))
        return decoded

    @property
    def kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = self.body[1]
        return kwargs


def queued_messages(client: redis.Redis, queue: str) -> list[BrokerMessage]:
    """Every message waiting in `queue`, oldest first (workers BRPOP from the right)."""
    return [BrokerMessage(json.loads(raw)) for raw in reversed(client.lrange(queue, 0, -1))]


def new_queue() -> str:
    return f"test-relay-{uuid.uuid4().hex[:8]}"
