"""Chaos: transfers keep coming while the relay is SIGKILLed and restarted several times, Redis
is stopped and started, and the worker is SIGKILLed mid-task. When it settles, nothing is lost."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import httpx
import pytest

from core.settings import Settings
from tests.support.database import select
from tests.support.outbox import outbox_states
from tests.support.system import System
from tests.support.waiting import wait_until

pytestmark = pytest.mark.e2e

TRANSFERS = 300
ACCOUNTS = 12
OPENING = Decimal("100.00")


def _transfers(system: System, key: str, accounts: list[str], seconds: float) -> list[httpx.Response]:
    """TRANSFERS transfers spread over `seconds`, 8 at a time; some are refused for lack of funds."""
    rng = random.Random(42)
    plan = [(*rng.sample(accounts, 2), f"{rng.randint(100, 4000) / 100:.2f}") for _ in range(TRANSFERS)]
    pace = seconds / TRANSFERS
    local = threading.local()

    def send(index: int) -> httpx.Response:
        time.sleep(max(0.0, index * pace - (time.monotonic() - started)))
        if not hasattr(local, "client"):
            local.client = system.client(key)
        client: httpx.Client = local.client
        source, target, amount = plan[index]
        return client.post(
            "/api/v1/transactions/transfer", json={"from_account_id": source, "to_account_id": target, "amount": amount}
        )

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(send, range(TRANSFERS)))


def _chaos(system: System, stop: threading.Event) -> list[str]:
    """The faults, on a fixed schedule (seconds after the load starts)."""
    done: list[str] = []
    relay = system.processes["relay"]
    schedule = [
        (1.0, "kill relay", relay.kill),
        (1.6, "start relay", relay.start),
        (3.0, "kill relay", relay.kill),
        (3.3, "start relay", relay.start),
        (4.5, "stop redis", system.redis.stop),
        (7.5, "start redis", system.redis.start),
        (9.0, "kill worker mid-task", system.kill_worker_process),
        (10.5, "kill relay", relay.kill),
        (11.0, "start relay", relay.start),
    ]
    started = time.monotonic()
    for at, what, action in schedule:
        if stop.wait(max(0.0, at - (time.monotonic() - started))):
            break
        action()
        done.append(what)
    return done


# Audit tasks take 0.2 s, so the worker always has several in flight when it is killed.
@pytest.mark.parametrize("system_env", [{"AUDIT_WRITE_DELAY": "0.2"}])
def test_nothing_is_lost_through_relay_crashes_a_redis_restart_and_a_worker_kill(
    system: System, settings: Settings
) -> None:
    database = settings.libpq_database_url
    key = system.new_client_key("chaos")
    accounts = system.funded_accounts(key, *[str(OPENING)] * ACCOUNTS)
    deposits = {r["id"] for r in select(database, "SELECT id::text AS id FROM transactions WHERE kind = 'deposit'")}
    assert len(deposits) == ACCOUNTS
    stop = threading.Event()
    faults: list[str] = []
    chaos = threading.Thread(target=lambda: faults.extend(_chaos(system, stop)))
    chaos.start()
    try:
        responses = _transfers(system, key, accounts, seconds=12)
    finally:
        chaos.join(timeout=30)
        stop.set()
    assert len(faults) == 9, faults
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= {201, 409}, statuses
    committed = {r.json()["id"] for r in responses if r.status_code == 201}
    assert len(committed) > TRANSFERS // 3

    # Settles well within the completion deadline (15 s) plus a reconcile pass or two.
    wait_until(lambda: set(outbox_states(database)) == {"completed"}, 120, "every outbox row completed", interval=1)

    rows = select(database, "SELECT id::text AS id, task_name, transaction_id::text AS tx, republishes FROM outbox")
    recorded = committed | deposits
    assert {r["tx"] for r in rows} == recorded
    assert Counter(r["task_name"] for r in rows) == {
        "send_transaction_email": len(recorded),
        "audit_log_transaction": len(recorded),
    }
    audit = Counter(r["transaction_id"] for r in select(database, "SELECT transaction_id FROM audit_log"))
    assert set(audit) == recorded
    assert set(audit.values()) == {1}, "an audit row was written twice"

    email_ids = {f"<{r['id']}@outbox-transfers>" for r in rows if r["task_name"] == "send_transaction_email"}
    received = Counter(message["Message-ID"] for message in system.smtp.received())
    assert set(received) == email_ids, "an email is missing, or one was sent for a refused transfer"
    # SMTP can't be part of a database transaction: a worker killed after the server accepted an
    # email but before recording it resends it, under the same Message-ID. At most the tasks that
    # worker had in flight (its concurrency) can be in that window.
    resent = sum(n - 1 for n in received.values())
    assert resent <= int(system.env["CELERY_WORKER_CONCURRENCY"]), received.most_common(3)

    total = select(database, "SELECT sum(balance) AS total, min(balance) AS lowest FROM accounts")[0]
    deposited = select(database, "SELECT sum(amount) AS total FROM transactions WHERE kind = 'deposit'")[0]["total"]
    assert total["total"] == deposited == OPENING * ACCOUNTS, "the books balance"
    assert total["lowest"] >= 0
    print(
        f"faults={faults} transfers={dict(statuses)} republished={sum(r['republishes'] for r in rows)} resent={resent}"
    )
