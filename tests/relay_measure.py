"""Measure the relay's drain rate against a send_task-per-row loop (run by hand; not a test).

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/relay_scratch \
    .venv/bin/python -m tests.relay_measure --rows 100000 --relays 1

The database must be migrated; its outbox table is emptied first. Prints events/s for the
relay subprocess(es) and for the baseline loop, and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import redis

from core.settings import Settings
from devservers.embedded import start_redis
from relay.celery_app import create_celery_app

FILL = """
INSERT INTO outbox (id, task_name, kwargs)
SELECT gen_random_uuid(), 'audit_log_transaction',
       jsonb_build_object('transaction_id', gen_random_uuid()::text,
                          'data', jsonb_build_object('amount', '10.00', 'currency', 'EUR', 'status', 'SUCCESS',
                                                     'from_account_id', gen_random_uuid()::text,
                                                     'to_account_id', gen_random_uuid()::text))
FROM generate_series(1, $1)
"""


async def fill(url: str, rows: int) -> None:
    connection = await asyncpg.connect(url)
    await connection.execute("TRUNCATE outbox")
    await connection.execute(FILL, rows)
    await connection.execute("VACUUM ANALYZE outbox")
    await connection.close()


async def wait_drained(url: str) -> float:
    """Seconds from the first publish to the last (the relays' start-up is not counted)."""
    connection = await asyncpg.connect(url)
    # Uses the partial index on pending rows: cheap enough not to slow the relay it watches.
    while await connection.fetchval("SELECT EXISTS (SELECT 1 FROM outbox WHERE state = 'pending')"):
        await asyncio.sleep(0.05)
    elapsed = await connection.fetchval("SELECT extract(epoch FROM max(published_at) - min(published_at)) FROM outbox")
    await connection.close()
    return float(elapsed)


def relay_rate(settings: Settings, rows: int, relays: int, queue: str) -> float:
    asyncio.run(fill(settings.libpq_database_url, rows))
    env = dict(os.environ, CELERY_TASK_QUEUE=queue, LOG_LEVEL="WARNING")
    processes = [subprocess.Popen([sys.executable, "-m", "relay"], env=env) for _ in range(relays)]
    try:
        elapsed = asyncio.run(wait_drained(settings.libpq_database_url))
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)
    return rows / elapsed


def send_task_rate(settings: Settings, rows: int, queue: str) -> float:
    app = create_celery_app(settings)
    kwargs = {"transaction_id": str(uuid.uuid4()), "data": {"amount": "10.00", "currency": "EUR", "status": "SUCCESS"}}
    with app.producer_or_acquire() as producer:
        started = time.perf_counter()
        for _ in range(rows):
            app.send_task(
                "audit_log_transaction", kwargs=kwargs, task_id=str(uuid.uuid4()), queue=queue, producer=producer
            )
        return rows / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--relays", type=int, default=1)
    parser.add_argument("--baseline-rows", type=int, default=20_000)
    args = parser.parse_args()
    # A private Redis: nobody else's flush or consumer can touch the measured queue.
    broker_url, broker = start_redis(Path(tempfile.mkdtemp(prefix="relay-measure-")), appendonly=False)
    os.environ["CELERY_BROKER_URL"] = broker_url
    settings = Settings()
    client = redis.Redis.from_url(broker_url)
    queue = "measure"
    try:
        fast = relay_rate(settings, args.rows, args.relays, queue)
        client.delete(queue)
        slow = send_task_rate(settings, args.baseline_rows, queue)
    finally:
        broker.terminate()
        broker.wait()
    print(
        f"relay x{args.relays}: {fast:,.0f} events/s   send_task loop: {slow:,.0f} events/s   ratio {fast / slow:.1f}x"
    )


if __name__ == "__main__":
    main()
