"""The baseline relays: Celery's send_task once per row, as the Python outbox libraries do.

``python -m bench.baseline_relay --poll-interval 1`` polls every second (their default);
``--poll-interval 0 --exit-when-empty`` drains a backlog as fast as send_task allows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import asyncpg
from celery import Celery

CLAIM = (
    "SELECT id, task_name, kwargs FROM outbox WHERE state = 'pending' "
    "ORDER BY created_at LIMIT $1 FOR UPDATE SKIP LOCKED"
)
MARK = (
    "UPDATE outbox SET state = 'published', published_at = clock_timestamp(), attempts = attempts + 1 "
    "WHERE id = ANY($1)"
)


async def run(database_url: str, celery: Celery, poll_interval: float, exit_when_empty: bool, batch: int) -> int:
    connection = await asyncpg.connect(database_url, server_settings={"plan_cache_mode": "force_custom_plan"})
    published = 0
    try:
        while True:
            async with connection.transaction():
                rows = await connection.fetch(CLAIM, batch)
                for row in rows:
                    celery.send_task(row["task_name"], kwargs=json.loads(row["kwargs"]), task_id=str(row["id"]))
                await connection.execute(MARK, [row["id"] for row in rows])
            published += len(rows)
            if not rows:
                if exit_when_empty:
                    return published
                await asyncio.sleep(poll_interval)
    finally:
        await connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--exit-when-empty", action="store_true")
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    celery = Celery(broker=os.environ["CELERY_BROKER_URL"])
    celery.conf.update(task_serializer="json", task_default_queue=os.environ.get("CELERY_TASK_QUEUE", "celery"))
    started = time.perf_counter()
    published = asyncio.run(
        run(os.environ["DATABASE_URL"], celery, args.poll_interval, args.exit_when_empty, args.batch)
    )
    print(json.dumps({"published": published, "elapsed_s": time.perf_counter() - started}))


if __name__ == "__main__":
    main()
