"""The long chaos run: twenty minutes (SOAK_SECONDS) of repeated faults under a steady load.

Not part of `make test` (marker `soak`, deselected by default). Run it with
`.venv/bin/pytest -m soak tests/e2e/test_soak.py` (SOAK_SECONDS=300 for a shorter run).

Two relays and a supervised worker run while transfers keep coming; on a seeded random schedule
the broker is stopped for up to 30 s, a relay is SIGKILLed and restarted, a relay is frozen
(SIGSTOP) for longer than RELAY_IDLE_TRANSACTION_TIMEOUT, the worker is SIGKILLed mid-task, and a
message is deleted from the queue. Afterwards every row must complete, with one audit row per
transfer and one email per transfer, except the resends a killed worker may cause (SIGKILL after
the mail server accepted an email and before it was recorded: at most the tasks it had in flight).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable

import pytest

from tests.support.database import select
from tests.support.outbox import outbox_states
from tests.support.system import Managed, System, TransferLoad
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.soak, pytest.mark.e2e]

SECONDS = float(os.environ.get("SOAK_SECONDS", "1200"))
SOAK_ENV = {
    "RELAY_BACKOFF_BASE": "0.05",
    "RELAY_BACKOFF_MAX": "0.5",
    "RELAY_MAX_ATTEMPTS": "3",
    "RELAY_IDLE_TRANSACTION_TIMEOUT": "3",
    "AUDIT_WRITE_DELAY": "0.2",
}


def _freeze(relay: Managed, seconds: float) -> None:
    if relay.process is None or relay.process.poll() is not None:
        return
    relay.process.send_signal(signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        relay.process.send_signal(signal.SIGCONT)


def _restart(relay: Managed) -> None:
    relay.kill()
    time.sleep(0.5)
    relay.start()


def _lose_a_message(system: System) -> None:
    broker = system.redis.client()
    try:
        queued = broker.lrange("e2e", 0, -1)
        if queued:
            middle = queued[len(queued) // 2]
            broker.lrem("e2e", 1, middle.decode() if isinstance(middle, bytes) else middle)
    finally:
        broker.close()


@pytest.mark.timeout(SECONDS + 900)
@pytest.mark.parametrize("system_env", [SOAK_ENV])
def test_soak_repeated_outages_freezes_and_kills_under_steady_load(system: System) -> None:
    rng = random.Random(11)
    relays = [system.processes["relay"], system.add_relay("relay-2")]
    relays[1].start()
    worker_kills = 0

    def outage() -> None:
        system.redis.stop()
        try:
            time.sleep(rng.uniform(5, 30))
        finally:
            system.redis.start()

    def kill_worker() -> None:
        nonlocal worker_kills
        system.kill_worker_process()
        worker_kills += 1

    faults: dict[str, Callable[[], None]] = {
        "broker outage": outage,
        "relay killed": lambda: _restart(rng.choice(relays)),
        "relay frozen": lambda: _freeze(rng.choice(relays), rng.uniform(5, 20)),
        "worker killed": kill_worker,
        "message lost": lambda: _lose_a_message(system),
    }
    done: Counter[str] = Counter()
    accounts = system.open_accounts(12)
    ends = time.monotonic() + SECONDS
    with TransferLoad(system, accounts, rate=4) as load:
        while time.monotonic() < ends:
            time.sleep(rng.uniform(3, 15))
            name = rng.choice(sorted(faults))
            faults[name]()
            done[name] += 1
    print(f"faults: {dict(done)}; transfers: {len(load.committed)}")

    database = system.database_url
    wait_until(lambda: set(outbox_states(database)) == {"completed"}, 180, "every row completed", 2)
    rows = select(database, "SELECT id::text AS id, task_name, transaction_id::text AS tx, republishes FROM outbox")
    committed = system.with_deposits(load.committed)  # the deposits that funded the accounts notify too
    assert {r["tx"] for r in rows} == committed
    audit = Counter(r["transaction_id"] for r in select(database, "SELECT transaction_id FROM audit_log"))
    assert audit == dict.fromkeys(committed, 1)
    emails = {f"<{r['id']}@outbox-transfers>" for r in rows if r["task_name"] == "send_transaction_email"}
    received = Counter(message["Message-ID"] for message in system.smtp.received())
    assert set(received) == emails, "an email is missing, or one was sent for nothing"
    resent = sum(n - 1 for n in received.values())
    assert resent <= worker_kills * int(system.env["CELERY_WORKER_CONCURRENCY"]), received.most_common(5)
    print(f"republished: {sum(r['republishes'] for r in rows)}; emails resent: {resent} after {worker_kills} kills")
