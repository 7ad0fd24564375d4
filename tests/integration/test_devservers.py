"""`make run`'s plumbing against real servers and real processes: which PostgreSQL and Redis it picks,
that the embedded ones keep their data and stop when asked, and the keepalive restart policy."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import asyncpg
import pytest
import redis

from core.settings import Settings
from devservers.discovery import (
    broker_problem,
    forget_dead_handles,
    postgres_problem,
    resolve_services,
    start_embedded_redis,
)
from devservers.embedded import free_port
from devservers.run import process_env


def _settings(database_url: str, broker_url: str) -> Settings:
    return Settings(
        _env_file=None,
        database_url=database_url,
        celery_broker_url_override=broker_url,
        celery_result_backend_override=broker_url,
        redis_port=free_port(),
    )


def _closed_port_settings() -> Settings:
    port = free_port()  # nothing listens there
    return _settings(f"postgresql://postgres@127.0.0.1:{port}/postgres", f"redis://127.0.0.1:{port}/0")


def test_reachable_servers_are_used_and_nothing_is_started(servers: tuple[str, str], tmp_path: Path) -> None:
    database_url, redis_url = servers
    with ExitStack() as stack:
        found = resolve_services(_settings(database_url, redis_url), tmp_path, stack)
    assert (found.postgres.source, found.broker.source) == ("configured", "configured")
    assert found.broker.url == redis_url
    assert found.result_backend == redis_url
    assert found.postgres.url.split("@")[-1] == database_url.split("@")[-1]
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_result_backend_falls_back_to_the_broker(servers: tuple[str, str], tmp_path: Path) -> None:
    settings = _settings(servers[0], servers[1]).model_copy(
        update={"celery_result_backend_override": f"redis://127.0.0.1:{free_port()}/0"}
    )
    with ExitStack() as stack:
        found = resolve_services(settings, tmp_path, stack)
    assert found.result_backend == found.broker.url == servers[1]


def test_probes_say_why_a_server_is_unusable() -> None:
    settings = _closed_port_settings()
    assert "refused" in (postgres_problem(settings.libpq_database_url, timeout=1) or "").lower()
    assert "refused" in (broker_problem(settings.celery_broker_url, timeout=1) or "").lower()


async def _write_and_read_async(database_url: str, value: str | None) -> str | None:
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute("CREATE TABLE IF NOT EXISTS kept (value text)")
        if value is not None:
            await connection.execute("INSERT INTO kept VALUES ($1)", value)
        found: str | None = await connection.fetchval("SELECT max(value) FROM kept")
        return found
    finally:
        await connection.close()


def _write_and_read(database_url: str, value: str | None) -> str | None:
    return asyncio.run(_write_and_read_async(database_url, value))


def test_unreachable_servers_fall_back_to_embedded_ones_that_keep_their_data(tmp_path: Path) -> None:
    settings = _closed_port_settings()
    urls = []
    for attempt in ("first", "second"):
        with ExitStack() as stack:
            found = resolve_services(settings, tmp_path, stack)
            assert (found.postgres.source, found.broker.source) == ("embedded", "embedded")
            assert found.result_backend == found.broker.url
            client = redis.Redis.from_url(found.broker.url)
            if attempt == "first":
                client.set("kept", "yes")
                assert _write_and_read(found.postgres.url, "yes") == "yes"
            else:
                assert client.get("kept") == b"yes"
                assert _write_and_read(found.postgres.url, None) == "yes"
            client.close()
            urls.append((found.postgres.url, found.broker.url))
        # Leaving the stack stops both servers.
        assert postgres_problem(found.postgres.url, timeout=1) is not None
        assert broker_problem(found.broker.url, timeout=1) is not None
    assert (tmp_path / "postgres" / "PG_VERSION").is_file()
    assert (tmp_path / "redis" / "appendonlydir").is_dir()


def test_a_redis_left_behind_by_a_killed_run_is_stopped_before_a_new_one_starts(tmp_path: Path) -> None:
    # Two servers appending to one AOF would corrupt it.
    with ExitStack() as killed_run:
        old = start_embedded_redis(tmp_path, killed_run, preferred_port=free_port())
        with ExitStack() as next_run:
            new = start_embedded_redis(tmp_path, next_run, preferred_port=free_port())
            assert broker_problem(old, timeout=1) is not None
            assert broker_problem(new, timeout=1) is None


def test_a_dead_runs_handle_is_forgotten(tmp_path: Path) -> None:
    finished = subprocess.run([sys.executable, "-c", "pass"], check=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".handle_pids.json").write_text(f"[{os.getpid()}, {dead.pid}]")
    forget_dead_handles(tmp_path)
    assert (tmp_path / ".handle_pids.json").read_text() == f"[{os.getpid()}]"
    assert finished.returncode == 0


def test_processes_get_the_chosen_servers_and_the_venv_tools(servers: tuple[str, str], tmp_path: Path) -> None:
    with ExitStack() as stack:
        found = resolve_services(_settings(*servers), tmp_path, stack)
    env = process_env(Settings(_env_file=None, api_port=8123), found)
    assert env["DATABASE_URL"] == found.postgres.url
    assert env["CELERY_BROKER_URL"] == env["CELERY_RESULT_BACKEND"] == servers[1]
    assert env["API_PORT"] == "8123"
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["LOG_JSON"] == "false"
    explicit = Settings(_env_file=None, log_json=True)
    assert process_env(explicit, found).get("LOG_JSON") == os.environ.get("LOG_JSON")


def _keepalive(tmp_path: Path, script: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "devservers.keepalive", "--delay", "0.05", "--", sys.executable, "-c", script]
    return subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(Path.cwd())})


@pytest.mark.e2e
def test_keepalive_restarts_a_crashed_child_until_it_exits_cleanly(tmp_path: Path) -> None:
    # The child fails twice, then succeeds: keepalive runs it three times and exits 0.
    script = (
        "import pathlib, sys; runs = pathlib.Path('runs'); "
        "runs.write_text(runs.read_text() + 'x' if runs.exists() else 'x'); "
        "sys.exit(0 if len(runs.read_text()) >= 3 else 3)"
    )
    process = _keepalive(tmp_path, script)
    try:
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
    assert (tmp_path / "runs").read_text() == "xxx"


@pytest.mark.e2e
def test_keepalive_forwards_sigterm_and_does_not_restart(tmp_path: Path) -> None:
    # The child reports 'started' only once its handler is installed: a SIGTERM after that report
    # cannot arrive before the handler (no fixed sleep to let it install one).
    script = (
        "import pathlib, signal, sys, time\n"
        "def stop(*_):\n"
        "    pathlib.Path('stopped').write_text('graceful')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "pathlib.Path('started').write_text(pathlib.Path('started').read_text() + 'x' "
        "if pathlib.Path('started').exists() else 'x')\n"
        "time.sleep(60)\n"
    )
    process = _keepalive(tmp_path, script)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "started").exists():
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
    assert (tmp_path / "stopped").read_text() == "graceful"
    assert (tmp_path / "started").read_text() == "x"


@pytest.mark.parametrize("argv", [[], ["--"]])
def test_keepalive_needs_a_command(argv: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "devservers.keepalive", *argv], capture_output=True, check=False)
    assert result.returncode == 2
    assert b"no command given" in result.stderr
