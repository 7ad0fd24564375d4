"""Where the tests' PostgreSQL and Redis come from, in order: environment URLs,
testcontainers when a Docker engine is reachable, else the embedded servers `make run` uses."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

HOW_TO = (
    "Set TEST_DATABASE_URL (e.g. postgresql://postgres@127.0.0.1:5432/postgres) and "
    "TEST_REDIS_URL (e.g. redis://127.0.0.1:6379/15), start Docker, or install the "
    "'embedded' extra (pip install -e '.[dev]')."
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


@contextmanager
def redis_server(stack: ExitStack) -> Iterator[str]:
    """Yield the URL of a Redis database the tests may flush."""
    url = os.environ.get("TEST_REDIS_URL")
    if url:
        yield url
        return
    if _docker_reachable():
        from testcontainers.redis import RedisContainer

        container = stack.enter_context(RedisContainer("redis:7-alpine"))
        yield f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0"
        return
    from devservers.embedded import start_redis

    url, process = start_redis(Path(tempfile.mkdtemp(prefix="test-redis-")))
    stack.callback(process.wait)
    stack.callback(process.terminate)
    yield url
