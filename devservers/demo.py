"""`make demo`: show the whole path work against a running service (`make run` in another terminal).

As the operator (ADMIN_API_KEY, else the development key `make run` wrote to .data/admin-api-key) it
creates a client; as that client it opens two accounts, which the operator funds with deposits; then a
few transfers and one that must fail (insufficient funds: nothing is written, so no task). It waits
until every task of every deposit and transfer has run and prints each with its tasks' states.
The API is at API_BASE_URL (default http://127.0.0.1:$API_PORT, port 8000 unless set).
Exit status 0 only if every task completed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import httpx

from devservers.run import ADMIN_KEY_FILE

TERMINAL = {"completed", "failed", "dead"}


class DemoError(Exception):
    """The service answered something the demo cannot go on from."""


def operator_key() -> str:
    """ADMIN_API_KEY, else the development key `make run` made."""
    key = os.environ.get("ADMIN_API_KEY")
    if key:
        return key
    if ADMIN_KEY_FILE.exists():
        return ADMIN_KEY_FILE.read_text().strip()
    raise DemoError(
        f"no operator key: set ADMIN_API_KEY, or start the service with `make run` (it writes {ADMIN_KEY_FILE})"
    )


def create_client(operator: httpx.Client, name: str) -> dict[str, Any]:
    return _body(operator.post("/api/v1/clients", json={"name": name}), 201)


def create_account(http: httpx.Client, email: str) -> dict[str, Any]:
    return _body(http.post("/api/v1/accounts", json={"owner_email": email, "currency": "EUR"}), 201)


def deposit(operator: httpx.Client, account_id: str, amount: str) -> dict[str, Any]:
    answer = operator.post(
        f"/api/v1/accounts/{account_id}/deposits",
        json={"amount": amount},
        headers={"Idempotency-Key": str(uuid.uuid4())},
    )
    return _body(answer, 201)


def transfer(http: httpx.Client, source: str, target: str, amount: str) -> httpx.Response:
    body = {"from_account_id": source, "to_account_id": target, "amount": amount}
    return http.post("/api/v1/transactions/transfer", json=body, headers={"Idempotency-Key": str(uuid.uuid4())})


def wait_for_tasks(http: httpx.Client, transaction_ids: Sequence[str], timeout: float) -> dict[str, dict[str, Any]]:
    """Poll each transaction until all its messages reach a final state or timeout passes; return the last views."""
    deadline = time.monotonic() + timeout
    views: dict[str, dict[str, Any]] = {}
    while True:
        for transaction_id in transaction_ids:
            views[transaction_id] = _body(http.get(f"/api/v1/transactions/{transaction_id}"), 200)
        waiting = sum(1 for view in views.values() for m in view["messages"] if m["state"] not in TERMINAL)
        if not waiting or time.monotonic() >= deadline:
            return views
        print(f"  ... {waiting} task(s) still running", flush=True)
        time.sleep(1.0)


def show(view: dict[str, Any], names: dict[str, str]) -> str:
    """One deposit or transfer and the state of each of its tasks, as printable lines."""
    source = names[view["from_account_id"]] if view["from_account_id"] else "deposit"
    lines = [
        f"{view['kind']} {view['id']}: {source} -> {names[view['to_account_id']]} "
        f"{view['amount']} {view['currency']} ({view['status']}); its tasks, times after it:"
    ]
    created = datetime.fromisoformat(view["created_at"])
    for message in view["messages"]:
        note = f"  last_error={message['last_error']}" if message.get("last_error") else ""
        lines.append(
            f"    {message['task_name']:<24} {message['state']:<10} attempts={message['attempts']}"
            f"  published {_after(created, message['published_at'])}"
            f"  completed {_after(created, message['completed_at'])}{note}"
        )
    return "\n".join(lines)


def _after(start: datetime, moment: str | None) -> str:
    """'+1.234s' after start, or '-' when it has not happened."""
    if moment is None:
        return "-"
    return f"+{(datetime.fromisoformat(moment) - start).total_seconds():.3f}s"


def run(base_url: str, timeout: float) -> int:
    admin = {"Authorization": f"Bearer {operator_key()}"}
    with httpx.Client(base_url=base_url, timeout=10.0, headers=admin) as operator:
        _check_service(operator, base_url)
        client = create_client(operator, f"demo-{uuid.uuid4().hex[:6]}")
        print(f"client {client['name']} {client['id']} created by the operator; its key is shown once, at creation")
        with httpx.Client(
            base_url=base_url, timeout=10.0, headers={"Authorization": f"Bearer {client['api_key']}"}
        ) as http:
            return _as_client(operator, http, timeout)


def _as_client(operator: httpx.Client, http: httpx.Client, timeout: float) -> int:
    alice = create_account(http, "alice@example.com")
    bob = create_account(http, "bob@example.com")
    names = {alice["id"]: "alice", bob["id"]: "bob"}
    print(f"accounts (opened at 0.00): alice {alice['id']}, bob {bob['id']}")
    transaction_ids = []
    for account, amount in ((alice, "100.00"), (bob, "50.00")):
        view = deposit(operator, account["id"], amount)
        transaction_ids.append(view["id"])
        print(f"deposit {view['id']}: {amount} EUR into {names[account['id']]} (by the operator)")
    for source, target, amount in ((alice, bob, "10.00"), (bob, alice, "2.50"), (alice, bob, "7.25")):
        view = _body(transfer(http, source["id"], target["id"], amount), 201)
        transaction_ids.append(view["id"])
        print(f"transfer {view['id']}: {names[source['id']]} -> {names[target['id']]} {amount} EUR accepted")

    refused = transfer(http, bob["id"], alice["id"], "1000.00")
    code = refused.json().get("error", {}).get("code") if refused.status_code >= 400 else None
    if refused.status_code != 409:
        raise DemoError(f"expected 409 insufficient funds, got {refused.status_code}: {refused.text}")
    print(f"transfer bob -> alice 1000.00 EUR refused: {refused.status_code} {code} (nothing written, so no task)")

    print(f"waiting up to {timeout:g}s for the tasks (each takes a couple of seconds on the worker)...")
    views = wait_for_tasks(http, transaction_ids, timeout)
    print()
    for transaction_id in transaction_ids:
        print(show(views[transaction_id], names))
    print()
    for account, name in ((alice, "alice"), (bob, "bob")):
        balance = _body(http.get(f"/api/v1/accounts/{account['id']}"), 200)["balance"]
        print(f"balance {name}: {balance} EUR")
    print("the books balance: 150.00 EUR deposited, and the balances add up to it")
    return _verdict(views, timeout)


def _verdict(views: dict[str, dict[str, Any]], timeout: float) -> int:
    states = [m["state"] for view in views.values() for m in view["messages"]]
    if all(state == "completed" for state in states):
        print(f"all {len(states)} tasks completed.")
        return 0
    unfinished = [state for state in states if state not in TERMINAL]
    if unfinished:
        print(
            f"{len(unfinished)} task(s) not finished after {timeout:g}s. Is the relay and a Celery worker running "
            "(`make run` starts both)? Look at their log lines."
        )
    else:
        print("some tasks ended failed or dead: see last_error above.")
    return 1


def _check_service(http: httpx.Client, base_url: str) -> None:
    try:
        answer = http.get("/health/ready")
    except httpx.TransportError as exc:
        raise DemoError(f"no service answers at {base_url} ({exc}). Start it first with `make run`.") from None
    if answer.status_code != 200:
        raise DemoError(f"the service at {base_url} is not ready: {answer.status_code} {answer.text}")


def _body(answer: httpx.Response, expected: int) -> dict[str, Any]:
    if answer.status_code != expected:
        raise DemoError(f"{answer.request.method} {answer.request.url} -> {answer.status_code}: {answer.text}")
    body: dict[str, Any] = answer.json()
    return body


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devservers.demo", description=__doc__.splitlines()[0])
    default_url = os.environ.get("API_BASE_URL") or f"http://127.0.0.1:{os.environ.get('API_PORT', '8000')}"
    parser.add_argument("--base-url", default=default_url, help=f"the API (default {default_url})")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the tasks (default 60)")
    args = parser.parse_args(argv)
    try:
        return run(args.base_url.rstrip("/"), args.timeout)
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    except httpx.TransportError as exc:
        print(f"demo: lost the service at {args.base_url} ({exc}); is `make run` still running?", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
