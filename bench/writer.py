"""A steady-rate writer: commits transactions that each add a transfer's two outbox rows.

Open loop: transaction i starts at start + i / rate whatever the previous ones took, so a slow
commit shows up as latency, not as a lower rate. Like the API, it sends a coalesced NOTIFY
(at most one per OUTBOX_NOTIFY_INTERVAL). It writes the outbox rows alone (no account
updates) so that 1,000 transfers/s fits on two cores beside the relay, PostgreSQL and Redis;
the relay sees exactly what transfers produce. Prints JSON lines: outbox ids and commit time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid

import asyncpg

from core.contract import AUDIT_LOG_TRANSACTION, SEND_TRANSACTION_EMAIL, TaskMessage
from core.outbox import queries
from core.outbox.notifier import CommitNotifier

EMAIL = TaskMessage(SEND_TRANSACTION_EMAIL, {"email": "bench@example.com", "amount": "1.00", "status": "SUCCESS"})


async def run(database_url: str, rate: float, duration: float, notify_interval: float) -> list[dict[str, object]]:
    pool = await asyncpg.create_pool(database_url, min_size=8, max_size=8)
    assert pool is not None
    records: list[dict[str, object]] = []
    notifier = CommitNotifier(notify_interval)

    async def one() -> None:
        ids = [uuid.uuid4(), uuid.uuid4()]
        audit = TaskMessage(AUDIT_LOG_TRANSACTION, {"transaction_id": str(ids[0]), "data": {"amount": "1.00"}})
        async with pool.acquire() as connection, connection.transaction():
            await queries.insert_messages(connection, ids, [EMAIL, audit], None)
            await notifier.maybe_notify(connection)
        records.append({"ids": [str(i) for i in ids], "committed": time.time()})

    started = time.monotonic()
    pending: set[asyncio.Task[None]] = set()
    total = int(rate * duration)
    for index in range(total):
        delay = started + index / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one())
        pending.add(task)
        task.add_done_callback(pending.discard)
    await asyncio.gather(*pending)
    await pool.close()
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, required=True, help="transfers per second")
    parser.add_argument("--duration", type=float, required=True, help="seconds")
    args = parser.parse_args()
    interval = float(os.environ.get("OUTBOX_NOTIFY_INTERVAL", "0.01"))
    records = asyncio.run(run(os.environ["DATABASE_URL"], args.rate, args.duration, interval))
    for record in records:
        sys.stdout.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
