"""The database goes away under a steady load of transfers, with the API, the relay and the
worker running as real processes: PostgreSQL is restarted (fast mode), or every connection of
the service is terminated while it stays up. The API refuses (503) only what the fault
touched, never answers 500 or drops a connection, and every committed transfer's tasks run once.

These tests run on a PostgreSQL server of their own (started here, restarted here), never on
the shared server the rest of the suite uses."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from alembic import command
from sqlalchemy import make_url

from core.settings import Settings
from tests.support.database import alembic_config, async_url, run_admin, select
from tests.support.load import Answer, open_accounts, steady_transfers
from tests.support.outbox import all_completed
from tests.support.servers import OwnPostgres, own_postgres
from tests.support.system import System
from tests.support.waiting import wait_until

pytestmark = pytest.mark.e2e

RATE = 30.0  # transfers offered per second
SECONDS = 6.0
FAULT_AT = 2.0  # seconds into the load
CONCURRENCY = 8  # load clients; fewer than the API's pool (DB_POOL_SIZE), so each holds one connection
ACCOUNTS = 10

# The service's own sessions (API, relay, worker) in the test's own database, nobody else's.
SERVICE_SESSIONS = """
SELECT pid, application_name FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
  AND (application_name IN ('outbox-api', 'outbox-worker') OR application_name LIKE 'relay%')
"""


@pytest.fixture(scope="module")
def server() -> Iterator[OwnPostgres]:
    with own_postgres() as running:
        yield running


@pytest.fixture(scope="module")
def database_url(server: OwnPostgres) -> str:
    """Overrides the suite's database: a migrated one on this module's own server."""
    asyncio.run(run_admin(server.admin_url, 'CREATE DATABASE "outages"'))
    url = async_url(make_url(server.admin_url).set(database="outages").render_as_string(hide_password=False))
    command.upgrade(alembic_config(url), "head")
    return url


def _under_load(system: System, fault: Callable[[], tuple[float, float]]) -> tuple[list[Answer], tuple[float, float]]:
    """Run the steady load and, FAULT_AT seconds in, `fault()`, which returns the (start, end)
    of the time the database was unusable."""
    accounts = open_accounts(system, ACCOUNTS)
    with ThreadPoolExecutor(1) as background:
        load = background.submit(
            steady_transfers, system, accounts, rate=RATE, seconds=SECONDS, concurrency=CONCURRENCY
        )
        time.sleep(FAULT_AT)
        window = fault()
        return load.result(), window


def _check_answers(answers: list[Answer], window: tuple[float, float]) -> dict[str, float]:
    """Every answer is 201/409/422/503; every 503 came while the database was unusable, plus at
    most one per request in flight when the fault began (each holds one pooled connection)."""
    start, end = window
    statuses = Counter(a.status for a in answers)
    assert not [a.error for a in answers if a.error], "a request got no HTTP answer"
    assert set(statuses) <= {201, 409, 422, 503}, statuses
    refused = [a for a in answers if a.status == 503]
    assert all(a.retry_after == "1" for a in refused)
    in_flight = sum(1 for a in answers if a.sent <= start <= a.received)
    outside = [a for a in refused if not a.overlaps(start, end)]
    assert not [a for a in outside if a.received < start], "a 503 before the fault"
    assert len(outside) <= in_flight, (len(outside), in_flight)
    # After the fault, the service is back for good: no 503 a second after the database was.
    assert not [a for a in refused if a.sent > end + 1.0]
    first, last = (min(a.sent for a in refused), max(a.received for a in refused)) if refused else (start, start)
    return {
        "unusable_s": round(end - start, 3),
        "answers": len(answers),
        "created": statuses[201],
        "refused_503": len(refused),
        "refused_after_back": len([a for a in refused if a.sent > end]),
        "in_flight_at_fault": in_flight,
        "refusing_for_s": round(last - first, 3),
    }


def _check_tasks(system: System, database: str, answers: list[Answer]) -> None:
    """Every committed transfer's (and the funding deposits') two tasks completed once: one email,
    one audit row."""
    wait_until(lambda: all_completed(database), 60, "every outbox row completed", interval=0.5)
    created = {a.transaction_id for a in answers if a.status == 201}
    transfers = {r["id"] for r in select(database, "SELECT id::text AS id FROM transactions WHERE kind = 'transfer'")}
    assert created <= transfers, "a transfer answered 201 was lost"
    # A 503 whose COMMIT reached the server before the connection broke may still have committed.
    assert len(transfers - created) <= sum(1 for a in answers if a.status == 503)
    system.each_transfer_once(transfers)


def test_a_database_restart_under_load_refuses_only_while_it_is_down(
    system: System, server: OwnPostgres, settings: Settings
) -> None:
    def restart() -> tuple[float, float]:
        down = time.monotonic()
        server.restart("fast")  # returns once the server accepts connections again
        return down, time.monotonic()

    answers, window = _under_load(system, restart)

    measured = _check_answers(answers, window)
    _check_tasks(system, settings.libpq_database_url, answers)
    assert "reconnecting" in system.processes["relay"].log()  # the relay did lose its connections
    print(f"restart under load: {measured}")


def test_while_the_database_is_stopped_requests_fail_fast_and_ready_says_so(
    system: System, server: OwnPostgres, settings: Settings
) -> None:
    """A longer outage (2 s, past the relay's first reconnect delays): every request in it is
    refused at once, /health/ready reports the database, and all is back as soon as it is."""
    readiness: list[tuple[int, dict[str, str], str | None]] = []

    def stop_for_two_seconds() -> tuple[float, float]:
        down = time.monotonic()
        server.stop("fast")
        with system.client() as client:
            ready = client.get("/health/ready")
        readiness.append((ready.status_code, ready.json()["error"], ready.headers.get("Retry-After")))
        time.sleep(max(0.0, down + 2.0 - time.monotonic()))
        server.start()
        return down, time.monotonic()

    answers, window = _under_load(system, stop_for_two_seconds)

    measured = _check_answers(answers, window)
    unavailable = {"code": "not_ready", "message": "database unavailable", "details": [{"component": "database"}]}
    assert readiness == [(503, unavailable, "1")]
    refused = [a for a in answers if a.status == 503]
    assert len(refused) >= RATE  # the outage did refuse work (about 2 s of it)
    slowest = max(a.received - a.sent for a in refused)
    assert slowest < 0.5, f"a refusal took {slowest:.3f} s"
    _check_tasks(system, settings.libpq_database_url, answers)
    print(f"database stopped under load: {measured}, slowest 503: {slowest:.3f} s")


def test_all_service_connections_dropped_under_load_refuses_only_what_was_in_flight(
    system: System, settings: Settings
) -> None:
    database = settings.libpq_database_url
    victims: dict[int, str] = {}

    def sessions() -> dict[int, str]:
        return {r["pid"]: r["application_name"] for r in select(database, SERVICE_SESSIONS)}

    def terminate() -> tuple[float, float]:
        start = time.monotonic()
        victims.update(sessions())
        select(database, "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", list(victims))
        wait_until(lambda: not victims.keys() & sessions().keys(), 10, "the terminated sessions gone", 0.01)
        return start, time.monotonic()

    answers, window = _under_load(system, terminate)

    measured = _check_answers(answers, window)
    _check_tasks(system, database, answers)
    names = set(victims.values())
    assert {"outbox-api", "outbox-worker", "relay-listen"} <= names, names  # every process lost its connections
    assert "reconnecting" in system.processes["relay"].log()
    print(f"connections dropped under load: {measured}, terminated: {sorted(names)} ({len(victims)})")
