"""The servers and processes a benchmark run uses: a fresh database, a Redis DB, subprocesses."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
from alembic import command
from alembic.config import Config
from sqlalchemy import make_url

from core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def admin_database_url() -> str:
    return (
        os.environ.get("BENCH_DATABASE_URL")
        or os.environ.get("DATABASE_URL")
        or "postgresql://postgres@127.0.0.1:5432/postgres"
    )


def bench_redis_url() -> str:
    return os.environ.get("BENCH_REDIS_URL") or "redis://127.0.0.1:6379/13"


def _plain(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _admin(sql: str) -> None:
    connection = await asyncpg.connect(_plain(admin_database_url()))
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


@contextmanager
def fresh_database() -> Iterator[str]:
    """A migrated database for this run (a libpq URL), dropped afterwards."""
    name = f"bench_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    url = _plain(make_url(admin_database_url()).set(database=name).render_as_string(hide_password=False))
    try:
        config = Config(str(ROOT / "alembic.ini"))
        config.attributes["database_url"] = url.replace("postgresql://", "postgresql+asyncpg://", 1)
        config.attributes["configure_logger"] = False
        command.upgrade(config, "head")
        yield url
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


def tuned_settings(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The numeric and boolean settings this run's environment sets (the processes it starts inherit
    them), so a results file says what it measured. Only those types: they are the tunables, and
    never a secret or a URL."""
    environ = dict(os.environ if environ is None else environ)
    tunable = {name.upper() for name, field in Settings.model_fields.items() if field.annotation in (int, float, bool)}
    return {name: value for name, value in sorted(environ.items()) if name.upper() in tunable}


def service_env(database_url: str, redis_url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url,
        CELERY_BROKER_URL=redis_url,
        CELERY_RESULT_BACKEND=redis_url,
        LOG_LEVEL="WARNING",
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


@contextmanager
def process(
    args: list[str], env: dict[str, str], *, port: int | None = None, log: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a subprocess for the duration of the block; terminate (then kill) it afterwards."""
    output = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    child = subprocess.Popen(args, env=env, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
    try:
        if port is not None:
            wait_for_port(port)
        yield child
    finally:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        if log:
            output.close()  # type: ignore[union-attr]


def python(*args: str) -> list[str]:
    return [sys.executable, *args]
