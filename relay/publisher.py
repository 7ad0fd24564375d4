"""Publishers: hand a batch of claimed rows to the broker and say, per row, whether it was accepted.

Two implementations behind one small interface:
- RedisBatchPublisher: builds each message with Celery's code in the exact form the Redis
  transport writes, and LPUSHes the whole batch in one pipeline round trip (the fast path).
- SendTaskPublisher: Celery's send_task per row, for any broker, off the event loop.
Both have a timeout, so a hung broker connection cannot stall the relay. Each row's outcome is
accepted (None), Refused (this message was turned down: counts an attempt) or Unsent (the broker
could not be reached: the row is left as it was, and the relay waits for the broker).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from celery import Celery
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from core.logging import describe
from core.outbox.queries import OutboxRow
from core.settings import Settings
from relay.broker import is_unreachable
from relay.celery_app import create_celery_app
from relay.messages import RedisMessageBuilder
from relay.tracing import PublishTracer


@dataclass(frozen=True, slots=True)
class Refused:
    """The broker, or the message builder, turned this message down: an attempt is counted."""

    error: str


@dataclass(frozen=True, slots=True)
class Unsent:
    """Not handed to the broker, and no attempt counted. With `broker_down` (the broker could not be
    reached) the relay waits for the broker; without, the row simply goes in a later batch."""

    error: str
    broker_down: bool = True


# One publish outcome per row, in order: None when the broker accepted it.
Outcome = Refused | Unsent | None
Outcomes = list[Outcome]


class Publisher(Protocol):
    async def publish(self, rows: Sequence[OutboxRow]) -> Outcomes:
        """Publish each row as a task named row.task_name with task id str(row.id).

        Never raises for a broker or message problem: every row gets an outcome. A row
        reported as not accepted may still have reached the broker (e.g. a timeout after the
        write); the caller treats that as a possible duplicate, never as a loss.
        """
        ...

    async def probe(self) -> str | None:
        """Ask the broker whether it answers now: None if it does, else why not. Never raises."""
        ...

    async def close(self) -> None: ...


class RedisBatchPublisher:
    """One pipelined round trip per batch to a Redis broker (redis:// or rediss://)."""

    def __init__(
        self, app: Celery, broker_url: str, queue: str, timeout: float, tracer: PublishTracer | None = None
    ) -> None:
        self._builder = RedisMessageBuilder(app, queue)
        self._tracer = tracer or PublishTracer(queue)
        self._timeout = timeout
        # No automatic retries: a retried pipeline could push the batch twice, and the relay
        # already retries each row with backoff.
        self._redis = Redis.from_url(
            broker_url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
        )
        self._declared = False

    async def publish(self, rows: Sequence[OutboxRow]) -> Outcomes:
        spans, headers = self._tracer.start(rows)
        outcomes = await self._publish(rows, headers)
        self._tracer.end(spans, outcomes)
        return outcomes

    async def _publish(self, rows: Sequence[OutboxRow], headers: list[dict[str, Any]]) -> Outcomes:
        outcomes: Outcomes = [None] * len(rows)
        # One LPUSH per list key with every payload, in claim order: Redis pushes the values
        # one after the other, exactly as one LPUSH per message would, for a fraction of the cost.
        by_key: dict[str, tuple[list[int], list[bytes]]] = {}
        for index, row in enumerate(rows):
            if row.decode_error is not None:
                outcomes[index] = Refused(f"cannot build message: {row.decode_error}")
                continue
            try:
                key, payload = self._builder.build(str(row.id), row.task_name, row.kwargs, headers=headers[index])
            except Exception as exc:  # a poison row fails alone, whatever it raises
                outcomes[index] = Refused(f"cannot build message: {describe(exc)}")
                continue
            indexes, payloads = by_key.setdefault(key, ([], []))
            indexes.append(index)
            payloads.append(payload)
        if not by_key:
            return outcomes
        pipeline = self._redis.pipeline(transaction=False)
        for key, (_, payloads) in by_key.items():
            pipeline.lpush(key, *payloads)
        if not self._declared:
            for command, key, member in self._builder.binding_commands():
                getattr(pipeline, command)(key, member)
        try:
            async with asyncio.timeout(self._timeout):
                results = await pipeline.execute(raise_on_error=False)
        except Exception as exc:  # any broker failure fails the batch's rows, never the relay
            results = [exc] * len(by_key)
        finally:
            await pipeline.reset()  # type: ignore[no-untyped-call]
        for (indexes, _), result in zip(by_key.values(), results, strict=False):
            if isinstance(result, Exception):
                error = f"broker did not accept the message: {describe(result)}"
                outcome = Unsent(error) if is_unreachable(result) else Refused(error)
                for index in indexes:
                    outcomes[index] = outcome
        self._declared = not any(isinstance(r, Exception) for r in results)
        return outcomes

    async def probe(self) -> str | None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._redis.ping()
        except Exception as exc:  # whatever it is, the broker does not answer
            return describe(exc)
        return None

    async def close(self) -> None:
        await self._redis.aclose()


class SendTaskPublisher:
    """Celery's send_task per row, in a worker thread, for brokers without a batch path."""

    def __init__(
        self,
        app: Celery,
        queue: str,
        timeout: float,
        batch_budget: float | None = None,
        tracer: PublishTracer | None = None,
    ) -> None:
        self._app = app
        self._tracer = tracer or PublishTracer(queue)
        self._queue = queue
        self._timeout = timeout
        # A batch's transaction stays open while it publishes, and PostgreSQL ends a session idle in
        # it for RELAY_IDLE_TRANSACTION_TIMEOUT: a batch slower than that (a large one, a slow broker)
        # would be rolled back and published again, forever. Rows not sent within the budget are
        # left for the next batch instead.
        self._budget = batch_budget
        # One thread: publishes stay in claim order, and a hung call blocks only publishing.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-send-task")

    async def publish(self, rows: Sequence[OutboxRow]) -> Outcomes:
        spans, headers = self._tracer.start(rows)
        outcomes = await self._publish(rows, headers)
        self._tracer.end(spans, outcomes)
        return outcomes

    async def _publish(self, rows: Sequence[OutboxRow], headers: list[dict[str, Any]]) -> Outcomes:
        outcomes: list[Outcome | _Pending] = [PENDING] * len(rows)
        give_up = threading.Event()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self._publish_all, rows, headers, outcomes, give_up)
        done_before = -1
        ends = loop.time() + self._budget if self._budget is not None else float("inf")
        # The timeout applies to progress, not to the batch: it fires only if no row completes
        # within it, however large the batch.
        timed_out = Unsent(f"broker unavailable: publish timed out after {self._timeout:g}s")
        while True:
            wait = min(self._timeout, max(ends - loop.time(), 0.0))
            finished, _ = await asyncio.wait({future}, timeout=wait)
            done_now = sum(1 for o in outcomes if o is not PENDING)
            if finished:
                break
            if loop.time() >= ends:
                timed_out = Unsent(f"not sent within the batch's {self._budget:g}s budget", broker_down=False)
                break
            if done_now == done_before:  # no progress within the timeout: the broker does not answer
                break
            done_before = done_now
        if not future.done():
            give_up.set()
        return [timed_out if o is PENDING else o for o in list(outcomes)]  # type: ignore[misc]

    def _publish_all(
        self,
        rows: Sequence[OutboxRow],
        headers: list[dict[str, Any]],
        outcomes: list[Outcome | _Pending],
        give_up: threading.Event,
    ) -> None:
        try:
            self._publish_each(rows, headers, outcomes, give_up)
        except Exception as exc:  # acquiring the producer failed: nothing went out
            for index, outcome in enumerate(outcomes):
                if outcome is PENDING:
                    outcomes[index] = Unsent(f"broker unavailable: {describe(exc)}")

    def _publish_each(
        self,
        rows: Sequence[OutboxRow],
        headers: list[dict[str, Any]],
        outcomes: list[Outcome | _Pending],
        give_up: threading.Event,
    ) -> None:
        with self._app.producer_or_acquire() as producer:
            for index, row in enumerate(rows):
                if give_up.is_set():
                    return
                if row.decode_error is not None:
                    outcomes[index] = Refused(f"cannot publish: {row.decode_error}")
                    continue
                try:
                    self._app.send_task(
                        row.task_name,
                        kwargs=row.kwargs,
                        task_id=str(row.id),
                        queue=self._queue,
                        producer=producer,
                        headers=headers[index],
                    )
                except Exception as exc:
                    if not is_unreachable(exc):  # a poison row fails alone
                        outcomes[index] = Refused(f"cannot publish: {describe(exc)}")
                        continue
                    # The connection is down: the rest of the batch would fail the same way, slowly.
                    # (kombu reconnects by itself on the next batch or probe.)
                    error = Unsent(f"broker unavailable: {describe(exc)}")
                    for rest in range(index, len(rows)):
                        outcomes[rest] = error
                    return
                else:
                    outcomes[index] = None

    async def probe(self) -> str | None:
        try:
            await asyncio.wait_for(asyncio.to_thread(self._connect), self._timeout)
        except Exception as exc:  # whatever it is, the broker does not answer
            return describe(exc)
        return None

    def _connect(self) -> None:
        with self._app.connection_for_write() as connection:
            connection.connect()

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class _Pending:
    """Marks a row whose outcome the publishing thread has not written yet."""


PENDING = _Pending()


def create_publisher(settings: Settings) -> Publisher:
    """The fast Redis publisher when the broker is Redis and RELAY_FAST_PUBLISH is on, else send_task."""
    app = create_celery_app(settings)
    broker_url = settings.celery_broker_url
    if settings.relay_fast_publish and urlsplit(broker_url).scheme in ("redis", "rediss"):
        return RedisBatchPublisher(app, broker_url, settings.celery_task_queue, settings.relay_publish_timeout)
    budget = settings.relay_idle_transaction_timeout_s / 2
    return SendTaskPublisher(app, settings.celery_task_queue, settings.relay_publish_timeout, budget)
