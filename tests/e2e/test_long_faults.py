"""Faults that outlast every budget they cross, against the real processes (issue 11).

Short settings stand in for the production minutes and hours: the fault is kept up past
RELAY_MAX_ATTEMPTS, past several completion deadlines, past RELAY_IDLE_TRANSACTION_TIMEOUT and
the worker's lock waits and leases. Each test then checks the data: every row completed, one
email and one audit row per transfer, nothing dead.
"""

from __future__ import annotations

import json
import signal
import time

import psutil
import pytest

from tests.support.database import select
from tests.support.outbox import outbox_states
from tests.support.system import System, TransferLoad
from tests.support.waiting import wait_until

pytestmark = pytest.mark.e2e

OUTAGE = 20.0  # seconds the broker stays down: RELAY_MAX_ATTEMPTS (3) attempts would last about 0.5 s
BROKER_OUTAGE_ENV = {"RELAY_BACKOFF_BASE": "0.05", "RELAY_BACKOFF_MAX": "0.2", "RELAY_MAX_ATTEMPTS": "3"}


def _settled(system: System, timeout: float) -> None:
    wait_until(lambda: set(outbox_states(system.database_url)) == {"completed"}, timeout, "every row completed", 1)


@pytest.mark.parametrize("system_env", [BROKER_OUTAGE_ENV])
def test_a_broker_outage_far_longer_than_the_attempts_kills_nothing_and_costs_the_relay_no_cpu(system: System) -> None:
    accounts = system.open_accounts(6)
    relay = psutil.Process(system.processes["relay"].process.pid)  # type: ignore[union-attr]
    with TransferLoad(system, accounts, rate=5) as load:
        time.sleep(2)
        system.redis.stop()
        try:
            time.sleep(2)  # the relay notices and settles into probing
            cpu_before, wall_before = sum(relay.cpu_times()[:2]), time.monotonic()
            time.sleep(OUTAGE - 2)
            cpu = (sum(relay.cpu_times()[:2]) - cpu_before) / (time.monotonic() - wall_before)
            states = outbox_states(system.database_url)
        finally:
            system.redis.start()
        time.sleep(2)
    print(f"relay CPU during the outage: {cpu:.1%} of one core; states during it: {states}")
    assert states.get("dead", 0) == 0
    assert states.get("pending", 0) > 100  # transfers kept coming, and waited
    assert cpu < 0.10, f"the relay used {cpu:.0%} of a core while the broker was down"

    _settled(system, 90)
    system.each_transfer_once(load.committed)
    log = system.processes["relay"].log()
    assert log.count("broker unreachable; publishing paused") == 1
    assert log.count("broker reachable again") == 1
    assert "publish refused" not in log  # no attempt was counted


@pytest.mark.parametrize("system_env", [{"RELAY_COMPLETION_DEADLINE": "3", "RELAY_RECONCILE_INTERVAL": "0.5"}])
def test_a_backlog_older_than_four_deadlines_is_not_republished_and_a_message_lost_from_it_is(
    system: System,
) -> None:
    deadline = float(system.env["RELAY_COMPLETION_DEADLINE"])
    database = system.database_url
    accounts = system.open_accounts(6)
    # The deposits that funded them (two rows each) done first: the backlog is the transfers' alone.
    wait_until(lambda: outbox_states(database) == {"completed": 12}, 30, "the deposits' rows completed")
    system.processes["worker"].stop()
    started = time.monotonic()
    with system.holder() as client:
        committed = {system.transfer(client, accounts[i % 6], accounts[(i + 1) % 6]) for i in range(150)}
    wait_until(lambda: outbox_states(database) == {"published": 300, "completed": 12}, 30, "all 300 rows published")
    time.sleep(max(0.0, 4 * deadline - (time.monotonic() - started)) + 1)
    rows = select(database, "SELECT republishes FROM outbox")
    assert sum(r["republishes"] for r in rows) == 0, "a queued message was re-published"

    broker = system.redis.client()
    queued = broker.lrange("e2e", 0, -1)
    assert len(queued) == 300
    lost = str(queued[150], "utf-8") if isinstance(queued[150], bytes) else queued[150]  # from the middle
    assert broker.lrem("e2e", 1, lost) == 1
    lost_id = json.loads(lost)["headers"]["id"]
    broker.close()
    system.processes["worker"].start()

    _settled(system, 90)
    system.each_transfer_once(committed)
    rows = select(database, "SELECT id::text AS id, republishes, deliveries, last_error FROM outbox")
    assert {r["id"]: r["republishes"] for r in rows if r["republishes"]} == {lost_id: 1}
    assert {r["deliveries"] for r in rows} == {1}, "a row was delivered twice"
    assert next(r for r in rows if r["id"] == lost_id)["last_error"].startswith("re-published: ")


FROZEN_ENV = {"RELAY_IDLE_TRANSACTION_TIMEOUT": "3", "CELERY_WORKER_CONCURRENCY": "8"}
# Longer than RELAY_IDLE_TRANSACTION_TIMEOUT (3 s) plus everything a worker may wait on the frozen
# batch's rows: the 2 s lock_timeout of its start, three tries at completing the row (about 7 s),
# and its email lease (the 5 s task time limit).
FREEZE = 25.0


@pytest.mark.parametrize("system_env", [FROZEN_ENV])
def test_a_relay_frozen_inside_its_batch_holds_nothing_and_carries_on_after_it_wakes(system: System) -> None:
    database = system.database_url
    system.processes["relay"].stop()
    frozen = system.add_relay("frozen-relay", RELAY_TEST_HOLD_BEFORE_COMMIT="10")
    frozen.start()
    wait_until(lambda: "connected" in frozen.log(), 30, "the frozen relay connected")
    accounts = system.open_accounts(4)
    with system.holder() as client:
        committed = {system.transfer(client, accounts[i % 4], accounts[(i + 1) % 4]) for i in range(5)}
        wait_until(lambda: "holding the batch transaction" in frozen.log(), 30, "the relay held its batch")
        assert frozen.process is not None
        frozen.process.send_signal(signal.SIGSTOP)
        try:
            system.processes["relay"].start()  # another relay, while the first is frozen
            for i in range(5):
                committed.add(system.transfer(client, accounts[i % 4], accounts[(i + 1) % 4]))
                time.sleep(0.5)
            time.sleep(FREEZE - 2.5)
            frozen_for = FREEZE
            # Within the freeze the frozen batch's rows were released and published again.
            _settled(system, 60)
        finally:
            frozen.process.send_signal(signal.SIGCONT)
        wait_until(lambda: "reconnecting" in frozen.log(), 30, "the woken relay reconnected")
        system.processes["relay"].stop()
        for i in range(3):  # now only the woken relay can publish these
            committed.add(system.transfer(client, accounts[i % 4], accounts[(i + 1) % 4]))
    _settled(system, 60)
    system.each_transfer_once(committed)
    assert frozen.process.poll() is None, "the woken relay exited"
    print(f"frozen for {frozen_for:.0f}s; republished: {select(database, 'SELECT sum(republishes) AS n FROM outbox')}")


POISON = [
    ("audit_log_transaction", '{"a": 1e5000}', "undecodable kwargs"),
    ("audit_log_transaction", '{"a": ' + "[" * 5000 + "]" * 5000 + "}", "undecodable kwargs"),
    ("send_transaction_email", '["not", "an", "object"]', "kwargs must be a JSON object"),
    ("no_such_task", '{"x": 1}', "is not in the contract"),
]


def test_poison_rows_die_alone_and_the_transfers_beside_them_complete(system: System) -> None:
    database = system.database_url
    accounts = system.open_accounts(4)
    with system.holder() as client:
        committed = set()
        for i in range(20):
            committed.add(system.transfer(client, accounts[i % 4], accounts[(i + 1) % 4]))
            if i % 5 == 0:  # interleaved with the transfers' rows, in the same batches
                task_name, kwargs, _ = POISON[i // 5]
                select(
                    database,
                    "INSERT INTO outbox (id, task_name, kwargs) VALUES (gen_random_uuid(), $1, $2::text::jsonb)",
                    task_name,
                    kwargs,
                )

    def settled() -> bool:
        return outbox_states(database) == {"completed": 40 + 8, "dead": 4}  # 8: the funding deposits' rows

    wait_until(settled, 60, "transfers completed and poison rows dead", 1)
    dead = select(database, "SELECT task_name, last_error FROM outbox WHERE state = 'dead' ORDER BY created_at")
    assert [(r["task_name"], reason in r["last_error"]) for r, (_, _, reason) in zip(dead, POISON, strict=True)] == [
        (task_name, True) for task_name, _, _ in POISON
    ]
    rows = select(database, "SELECT state FROM outbox WHERE transaction_id IS NOT NULL")
    assert {r["state"] for r in rows} == {"completed"}
    time.sleep(2)  # several more polls: a reconnect loop would show by now
    assert "reconnecting" not in system.processes["relay"].log()
    assert len(system.smtp.received()) == 20 + 4  # the transfers' and the funding deposits' emails
