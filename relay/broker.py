"""What the relay knows about its broker: which errors mean "unreachable", and what its queue holds.

Unreachable (the broker as a whole cannot take messages now) is told apart from refused (this
message was turned down): only a refusal counts against a row's RELAY_MAX_ATTEMPTS, because an
outage of any length must not kill the backlog.

The reconciler asks the queue for evidence that a message is gone (core.outbox.queries.
reconcile_published): whether the queue is empty, and which messages workers hold unacknowledged.
- Redis: LLEN of the queue's lists (one per priority step) and the transport's `unacked` hash,
  whose entries name the task ids workers have taken and not acknowledged.
- RabbitMQ (amqp://): a passive queue_declare gives the number of ready messages. Messages a
  consumer holds unacknowledged are not visible, and do not need to be: RabbitMQ requeues them
  itself when their consumer goes away, and a running task has recorded its start.
- Anything else (memory://): nothing can be asked; only the database's evidence applies.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Protocol
from urllib.parse import urlsplit
from uuid import UUID

import redis.exceptions
from celery import Celery
from kombu.exceptions import OperationalError
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from core.outbox.queries import QueueObservation
from core.settings import Settings
from relay.celery_app import create_celery_app
from relay.messages import RedisMessageBuilder

log = logging.getLogger("relay.broker")

# Redis replies that turn down every write, whatever the message: the broker is unavailable.
# (LOADING, READONLY and OOM arrive as their own exception classes; these as plain ResponseError.)
_BROKER_WIDE_REPLIES = ("MISCONF", "MASTERDOWN", "NOREPLICAS", "CLUSTERDOWN", "TRYAGAIN", "BUSY")

UNKNOWN = QueueObservation(empty=None, held=None)


def is_unreachable(error: BaseException) -> bool:
    """True when the error says the broker cannot take any message now: it is down, unreachable,
    timed out, rejects our credentials, or turns down every write (loading its data, a read-only
    replica, out of memory, cannot persist). False when it refused this message (or a bug)."""
    if isinstance(error, redis.exceptions.ReadOnlyError | redis.exceptions.OutOfMemoryError):
        return True
    if isinstance(error, redis.exceptions.ResponseError):
        return str(error).split(" ", 1)[0] in _BROKER_WIDE_REPLIES
    return isinstance(
        error,
        redis.exceptions.ConnectionError  # includes BusyLoadingError (LOADING) and authentication
        | redis.exceptions.TimeoutError
        | OperationalError  # kombu: connection refused, lost or timed out (any transport)
        | OSError
        | TimeoutError,
    )


class QueueInspector(Protocol):
    async def observe(self) -> QueueObservation:
        """The queue as it is now; UNKNOWN (never an exception) when the broker cannot be asked."""
        ...

    async def close(self) -> None: ...


class RedisQueueInspector:
    """LLEN of the queue's priority lists, and the task ids in kombu's unacked hash for this queue."""

    def __init__(self, app: Celery, broker_url: str, queue: str, timeout: float) -> None:
        builder = RedisMessageBuilder(app, queue)
        self._keys = builder.queue_keys()
        self._unacked_key = builder.unacked_key
        self._queue = builder.queue_name
        self._timeout = timeout
        self._redis = Redis.from_url(
            broker_url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
        )

    async def observe(self) -> QueueObservation:
        try:
            async with asyncio.timeout(self._timeout):
                pipeline = self._redis.pipeline(transaction=False)
                for key in self._keys:
                    pipeline.llen(key)
                pipeline.hvals(self._unacked_key)
                *lengths, unacked = await pipeline.execute()
        except Exception as exc:  # an unreachable broker gives no evidence; the reconciler waits
            log.info("cannot inspect the broker's queue", extra={"event": "relay.inspect_failed", "error": str(exc)})
            return UNKNOWN
        return QueueObservation(empty=sum(lengths) == 0, held=frozenset(self._held(unacked)))

    def _held(self, entries: list[bytes]) -> list[UUID]:
        held = []
        for entry in entries:
            try:
                payload, _exchange, routing_key = json.loads(entry)
                if routing_key == self._queue:
                    held.append(UUID(str(payload["headers"]["id"])))
            except (ValueError, KeyError, TypeError):
                continue  # not one of ours (a hand-sent task id, another app's message)
        return held

    async def close(self) -> None:
        await self._redis.aclose()


class AmqpQueueInspector:
    """A passive queue_declare: the number of ready messages; unacknowledged ones are not visible."""

    def __init__(self, app: Celery, queue: str, timeout: float) -> None:
        self._app = app
        self._queue = queue
        self._timeout = timeout

    async def observe(self) -> QueueObservation:
        try:
            ready = await asyncio.wait_for(asyncio.to_thread(self._ready_messages), self._timeout)
        except Exception as exc:  # no evidence this time
            log.info("cannot inspect the broker's queue", extra={"event": "relay.inspect_failed", "error": str(exc)})
            return UNKNOWN
        return QueueObservation(empty=ready == 0, held=None)

    def _ready_messages(self) -> int:
        with self._app.connection_for_read() as connection:
            declared: Any = connection.default_channel.queue_declare(queue=self._queue, passive=True)
            return int(declared.message_count)

    async def close(self) -> None:
        return None


class NoInspector:
    """For brokers that cannot be asked: no evidence from the queue."""

    async def observe(self) -> QueueObservation:
        return UNKNOWN

    async def close(self) -> None:
        return None


def create_inspector(settings: Settings) -> QueueInspector:
    """The inspector for the configured broker (see the module docstring for what each can tell)."""
    url = settings.celery_broker_url
    scheme = urlsplit(url).scheme
    app = create_celery_app(settings)
    if scheme in ("redis", "rediss"):
        return RedisQueueInspector(app, url, settings.celery_task_queue, settings.relay_publish_timeout)
    if scheme in ("amqp", "amqps", "pyamqp"):
        return AmqpQueueInspector(app, settings.celery_task_queue, settings.relay_publish_timeout)
    return NoInspector()
