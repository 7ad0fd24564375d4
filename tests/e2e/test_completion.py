"""Tasks are done when their effects exist, not when they are published (issue: never lost)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from dataclasses import dataclass

import httpx
import pytest

from core.settings import Settings
from devservers.embedded import free_port
from tests.support.database import select
from tests.support.environment import ROOT
from tests.support.metrics import scrape, value
from tests.support.outbox import OutboxRecord, outbox_rows_now
from tests.support.system import System
from tests.support.waiting import wait_until

pytestmark = pytest.mark.e2e

RELAY_PORT = free_port()
FAST_RECONCILE = {
    "RELAY_COMPLETION_DEADLINE": "2",
    "RELAY_RECONCILE_INTERVAL": "0.3",
    "RELAY_METRICS_PORT": str(RELAY_PORT),  # its reconcile-runs counter says when passes have happened
}


def _reconcile_runs() -> float:
    try:
        return value(scrape(RELAY_PORT), "outbox_reconcile_runs_total")
    except httpx.HTTPError:  # not serving yet
        return 0.0


def _wait_reconcile_passes(passes: int, what: str) -> None:
    """Until the relay's reconciler has made `passes` more passes over the published rows."""
    target = _reconcile_runs() + passes
    wait_until(lambda: _reconcile_runs() >= target, 30, f"{passes} reconcile passes {what}")


@dataclass(frozen=True)
class Funded:
    """A client's two accounts, one funded; the deposit's tasks done and its outbox rows gone, so
    that the tests below see the transfer's rows alone. `emails`/`started`: the sink's counts then."""

    key: str
    source: str
    target: str
    emails: int
    started: int


def _funded(system: System) -> Funded:
    key = system.new_client_key()
    source, target = system.funded_accounts(key, "50", "0")
    database = system.env["DATABASE_URL"]
    wait_until(lambda: {r.state for r in _rows(database).values()} == {"completed"}, 30, "the deposit's tasks")
    select(database, "DELETE FROM outbox")
    return Funded(key, source, target, system.smtp.count, system.smtp.started)


def _transfer(system: System, funded: Funded) -> str:
    key, source, target = funded.key, funded.source, funded.target
    with system.client(key) as client:
        response = client.post(
            "/api/v1/transactions/transfer", json={"from_account_id": source, "to_account_id": target, "amount": "5.00"}
        )
    assert response.status_code == 201
    transaction_id: str = response.json()["id"]
    return transaction_id


def _rows(database: str) -> dict[str, OutboxRecord]:
    return {row.task_name: row for row in outbox_rows_now(database)}


@pytest.mark.parametrize("system_env", [FAST_RECONCILE])
def test_a_message_the_broker_lost_is_republished_and_runs_once(system: System, settings: Settings) -> None:
    database = settings.libpq_database_url
    funded = _funded(system)
    system.processes["worker"].stop()
    transaction_id = _transfer(system, funded)
    wait_until(lambda: {r.state for r in _rows(database).values()} == {"published"}, 15, "both rows published")

    broker = system.redis.client()
    assert broker.llen("e2e") == 2
    broker.delete("e2e")  # the broker loses both messages (a flush, a restart without persistence, kombu #305)
    broker.close()
    system.processes["worker"].start()

    wait_until(lambda: {r.state for r in _rows(database).values()} == {"completed"}, 30, "rows completed")
    rows = _rows(database)
    assert all(r.republishes == 1 for r in rows.values()), rows
    assert len(select(database, "SELECT 1 FROM audit_log WHERE transaction_id = $1", transaction_id)) == 1
    assert system.smtp.count == funded.emails + 1


@pytest.mark.parametrize("system_env", [FAST_RECONCILE])
def test_a_task_that_always_fails_is_failed_not_republished_and_listed_as_dead(
    system: System, settings: Settings
) -> None:
    database = settings.libpq_database_url
    poison = str(uuid.uuid4())
    select(
        database,
        "INSERT INTO outbox (id, task_name, kwargs) VALUES ($1, 'send_transaction_email', $2::jsonb)",
        poison,
        json.dumps({"email": "not-an-email", "amount": "1.00", "status": "SUCCESS"}),
    )
    wait_until(lambda: _rows(database)["send_transaction_email"].state == "failed", 20, "the row failed")
    # Passes past three completion deadlines: a reconciler that took a failed row for lost would
    # have re-published it by then.
    wait_until(lambda: _reconcile_runs() > 0, 30, "the relay's first reconcile pass")
    deadline, interval = (float(FAST_RECONCILE[k]) for k in ("RELAY_COMPLETION_DEADLINE", "RELAY_RECONCILE_INTERVAL"))
    _wait_reconcile_passes(int(3 * deadline / interval), "after the row failed")

    row = _rows(database)["send_transaction_email"]
    assert row.state == "failed"
    assert row.republishes == 0
    assert "email" in str(row.last_error)
    listed = subprocess.run(
        [sys.executable, "-m", "relay", "dead"], cwd=ROOT, env=system.env, capture_output=True, text=True, check=False
    )
    assert listed.returncode == 0, listed.stderr
    assert poison in listed.stdout


@pytest.mark.parametrize("system_env", [{**FAST_RECONCILE, "AUDIT_WRITE_DELAY": "3"}])
@pytest.mark.parametrize("smtp_reply_delay", [3.0])
def test_a_slow_task_still_running_at_the_deadline_is_not_republished_and_its_effect_happens_once(
    system: System, settings: Settings
) -> None:
    """Both tasks take 3 s, past the 2 s deadline, and are left alone while they run.

    The deadline is not evidence that a message is gone: each delivery recorded its start and
    its lease on the outbox row (and a worker holds the message unacknowledged), so the
    reconciler waits for it instead of publishing a second copy.
    """
    database = settings.libpq_database_url
    funded = _funded(system)
    transaction_id = _transfer(system, funded)
    wait_until(lambda: {r.state for r in _rows(database).values()} == {"completed"}, 30, "rows completed")
    _wait_reconcile_passes(10, "after completion")

    rows = _rows(database)
    assert {r.state for r in rows.values()} == {"completed"}
    assert all(r.republishes == 0 for r in rows.values()), rows
    assert len(select(database, "SELECT 1 FROM audit_log WHERE transaction_id = $1", transaction_id)) == 1
    assert system.smtp.count == funded.emails + 1
    assert system.smtp.started == funded.started + 1, "the duplicate delivery reached the SMTP server"
