"""A steady load of transfers over HTTP, with every answer and its timing kept, so that a test
can tell which refusals fell inside a fault and which came after it."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from tests.support.system import System


@dataclass(frozen=True)
class Answer:
    """One transfer request: when it was sent and answered (time.monotonic()), and how."""

    sent: float
    received: float
    status: int | None  # None: no HTTP answer at all (see `error`)
    transaction_id: str | None = None
    retry_after: str | None = None
    error: str | None = None  # a transport error: refused, reset, timed out

    def overlaps(self, start: float, end: float) -> bool:
        return self.sent <= end and self.received >= start


@dataclass(frozen=True)
class Accounts:
    key: str  # the API key of the client that owns them
    ids: list[str]


def open_accounts(system: System, count: int, balance: str = "1000.00") -> Accounts:
    """`count` accounts of a new client, each funded with `balance` by the operator."""
    key = system.new_client_key("load")
    return Accounts(key, system.funded_accounts(key, *[balance] * count))


def steady_transfers(
    system: System, accounts: Accounts, *, rate: float, seconds: float, concurrency: int
) -> list[Answer]:
    """Offer `rate` transfers a second for `seconds`, from `concurrency` clients (one
    keep-alive connection each), on a fixed schedule: a slow answer does not slow the offer
    down until all clients are busy. Returns every answer, in the order offered."""
    total = int(rate * seconds)
    rng = random.Random(15)
    plan = [(*rng.sample(accounts.ids, 2), f"{rng.randint(1, 500) / 100:.2f}") for _ in range(total)]
    local = threading.local()
    clients: list[httpx.Client] = []
    started = time.monotonic()

    def send(index: int) -> Answer:
        time.sleep(max(0.0, started + index / rate - time.monotonic()))
        if not hasattr(local, "client"):
            headers = {"Authorization": f"Bearer {accounts.key}"}
            local.client = httpx.Client(base_url=system.base_url, timeout=10, headers=headers)
            clients.append(local.client)
        client: httpx.Client = local.client
        source, target, amount = plan[index]
        body = {"from_account_id": source, "to_account_id": target, "amount": amount}
        sent = time.monotonic()
        try:
            response = client.post("/api/v1/transactions/transfer", json=body)
        except httpx.TransportError as exc:
            return Answer(sent, time.monotonic(), None, error=f"{type(exc).__name__}: {exc}")
        received = time.monotonic()
        created = response.json()["id"] if response.status_code == 201 else None
        return Answer(sent, received, response.status_code, created, response.headers.get("Retry-After"))

    try:
        with ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(send, range(total)))
    finally:
        for client in clients:
            client.close()
