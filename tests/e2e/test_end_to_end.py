"""The promise checked from the outside, against the real API, relay and worker processes."""

from __future__ import annotations

import pytest

from core.settings import Settings
from tests.support.database import select
from tests.support.outbox import all_completed, outbox_states
from tests.support.system import System
from tests.support.waiting import wait_until
from tests.support.workers import task_result

pytestmark = pytest.mark.e2e


def _accounts(system: System, *balances: str) -> tuple[str, list[str]]:
    """A new client's key, and its accounts holding `balances` (deposited by the operator)."""
    key = system.new_client_key()
    return key, system.funded_accounts(key, *balances)


def test_a_transfer_runs_both_tasks_once(system: System, settings: Settings) -> None:
    key, (source, target) = _accounts(system, "100.00", "0.00")
    database = settings.libpq_database_url
    wait_until(lambda: all_completed(database), 30, "the deposit's tasks completed")
    with system.client(key) as client:
        response = client.post(
            "/api/v1/transactions/transfer",
            json={"from_account_id": source, "to_account_id": target, "amount": "25.00"},
        )
        assert response.status_code == 201
        transaction_id = response.json()["id"]
        wait_until(lambda: all_completed(database), 30, "both tasks completed")
        detail = client.get(f"/api/v1/transactions/{transaction_id}").json()

    messages = {m["task_name"]: m for m in detail["messages"]}
    assert set(messages) == {"send_transaction_email", "audit_log_transaction"}
    assert all(m["state"] == "completed" and m["published_at"] and m["completed_at"] for m in messages.values())
    audit = select(database, "SELECT task_id, data FROM audit_log WHERE transaction_id = $1", transaction_id)
    assert len(audit) == 1
    assert audit[0]["task_id"] == messages["audit_log_transaction"]["id"]
    email_id = messages["send_transaction_email"]["id"]
    assert len(system.smtp.received(message_id=f"<{email_id}@outbox-transfers>")) == 1
    assert system.smtp.count == 2  # the deposit's email and the transfer's
    for message in messages.values():
        result = task_result(system.redis.url, message["id"])
        assert result is not None
        assert result["status"] == "SUCCESS"
        assert result["result"]["task_id"] == message["id"]


def test_failed_transfers_produce_no_task(system: System, settings: Settings) -> None:
    key, (source, target) = _accounts(system, "10.00", "0.00")
    database = settings.libpq_database_url
    wait_until(lambda: all_completed(database), 30, "the deposit's tasks")
    with system.client(key) as client:
        refused = [
            client.post(
                "/api/v1/transactions/transfer",
                json={"from_account_id": source, "to_account_id": target, "amount": "10.01"},
            ),
            client.post(
                "/api/v1/transactions/transfer",
                json={
                    "from_account_id": source,
                    "to_account_id": "00000000-0000-4000-8000-000000000000",
                    "amount": "1.00",
                },
            ),
        ]
        assert [r.status_code for r in refused] == [409, 404]
        # A successful transfer afterwards proves the pipeline was live while the others were refused.
        ok = client.post(
            "/api/v1/transactions/transfer", json={"from_account_id": source, "to_account_id": target, "amount": "1.00"}
        )
        assert ok.status_code == 201
    wait_until(lambda: all_completed(database), 30, "the successful transfer's tasks")
    assert select(database, "SELECT count(*) AS n FROM outbox")[0]["n"] == 4  # the deposit's two and the transfer's
    audited = [r["transaction_id"] for r in select(database, "SELECT transaction_id FROM audit_log ORDER BY id")]
    assert audited[-1] == ok.json()["id"]
    assert len(audited) == 2
    assert system.smtp.count == 2


def test_the_api_answers_without_waiting_for_any_task(system: System, settings: Settings) -> None:
    """With no worker running at all, transfers still commit and get their 201: the response
    cannot have waited for a task. (How fast it answers is `make bench`'s business.)"""
    key, (source, target) = _accounts(system, "100.00", "0.00")
    database = settings.libpq_database_url
    wait_until(lambda: all_completed(database), 30, "the deposit's tasks completed")
    emails_before = system.smtp.count
    system.processes["worker"].stop()
    with system.client(key) as client:
        responses = [
            client.post(
                "/api/v1/transactions/transfer",
                json={"from_account_id": source, "to_account_id": target, "amount": "1.00"},
            )
            for _ in range(10)
        ]
    assert [r.status_code for r in responses] == [201] * 10
    wait_until(lambda: outbox_states(database) == {"completed": 2, "published": 20}, 30, "all 20 rows published")
    committed = sorted(r.json()["id"] for r in responses)
    audited = "SELECT transaction_id AS id FROM audit_log WHERE transaction_id = ANY($1::text[])"
    assert select(database, audited, committed) == []
    assert system.smtp.count == emails_before

    system.processes["worker"].start()
    wait_until(lambda: all_completed(database), 60, "the tasks completed once a worker ran")
    assert sorted(r["id"] for r in select(database, audited, committed)) == committed
    system.smtp.wait_for(emails_before + 10)
    assert system.smtp.count == emails_before + 10
