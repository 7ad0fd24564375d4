"""Task messages in the exact form kombu's Redis transport writes for ``send_task``.

Celery's own code builds each message (``app.amqp.create_task_message``); this module then
does what ``amqp.send_task_message``, ``kombu.Producer.publish`` and the virtual transport's
``prepare_message`` / ``basic_publish`` / ``_put`` do for a direct queue, without the
per-message connection, declaration and signal machinery that makes ``send_task`` slow.
The result is the Redis key to LPUSH to and the JSON payload a worker reads from it.
"""

from __future__ import annotations

import base64
import itertools
from bisect import bisect
from typing import Any

import orjson
from celery import Celery
from celery.utils.nodenames import anon_nodename
from kombu.entity import maybe_delivery_mode
from kombu.transport.redis import Channel as RedisChannel
from kombu.utils.json import JSONEncoder
from kombu.utils.uuid import uuid

from relay.reprs import kwargs_repr

# The Redis transport keeps a queue's exchange bindings in these sets (kombu's Channel._queue_bind).
_BINDING_KEY = RedisChannel.keyprefix_queue
_PERMANENT_BINDING_KEY = RedisChannel.keyprefix_binding_permanent


class RedisMessageBuilder:
    """Builds the (key, payload) pairs that ``app.send_task(name, kwargs=..., task_id=..., queue=...)``
    would LPUSH, for one queue with a direct exchange.

    build() raises whatever Celery or the serializer raise for a bad row (TypeError for
    kwargs that are not a mapping, kombu EncodeError for unserializable values).
    """

    def __init__(self, app: Celery, queue_name: str) -> None:
        self._app = app
        conf = app.conf
        transport_options: dict[str, Any] = dict(conf.broker_transport_options or {})
        self._prefix: str = transport_options.get("global_keyprefix", "")
        self._sep: str = transport_options.get("sep", RedisChannel.sep)
        self._priority_steps: list[int] = list(transport_options.get("priority_steps", RedisChannel.priority_steps))
        self._unacked_key: str = transport_options.get("unacked_key", RedisChannel.unacked_key)
        if conf.task_serializer != "json":
            raise ValueError(f"the Redis fast path writes JSON messages; task_serializer is {conf.task_serializer!r}")
        queue = app.amqp.router.route({"queue": queue_name}, "", (), {}, None)["queue"]
        if queue.exchange.type != "direct":
            raise ValueError(f"queue {queue_name!r} has a {queue.exchange.type} exchange; only direct is supported")
        self.queue_name: str = queue.name
        mode = queue.exchange.delivery_mode or conf.task_default_delivery_mode
        self._delivery_mode = maybe_delivery_mode(mode)  # type: ignore[no-untyped-call]
        self._send_sent_event: bool = conf.task_send_sent_event
        self._kwargsrepr_maxsize: int = app.amqp.kwargsrepr_maxsize
        self._repr_maxlevels: int = conf.task_repr_maxlevels
        # For values orjson refuses (ints beyond 64 bits): kombu's own JSON encoder.
        self._encode_json = JSONEncoder().encode
        # What create_task_message computes per message when origin is not given; fixed per process.
        self._origin: str = anon_nodename()
        self._binding_member = self._sep.join([queue.routing_key or "", "", queue.name])
        # Looked up once: Celery's cached properties cost a few microseconds per access.
        self._create_task_message = app.amqp.create_task_message
        self._thread_oid = app.thread_oid  # the relay builds messages on its one event-loop thread
        # The Redis transport only needs delivery tags to be unique; kombu uses a uuid4 each, which
        # cost a sixth of the relay's CPU. A uuid4 per builder plus a counter is unique too.
        self._tag_prefix = uuid()
        self._tags = itertools.count()
        self._binding_exchange: str = queue.exchange.name

    def build(
        self, task_id: str, task_name: str, kwargs: Any, priority: int = 0, headers: dict[str, Any] | None = None
    ) -> tuple[str, bytes]:
        """The Redis list key and the JSON payload of one task message; `headers` are added to the
        message's headers, as ``send_task(headers=...)`` does (the trace context, the commit time)."""
        message_headers, properties, body, _sent_event = self._create_task_message(
            task_id, task_name, (), kwargs,
            None, None, None, None, None, 0, None, None, None,  # countdown .. link_error: none
            self._thread_oid, None, None, self._send_sent_event,
            None, None, None, None,  # root_id, parent_id, shadow, chain
            ignore_result=None, replaced_task_nesting=0,
            argsrepr="()", kwargsrepr=kwargs_repr(kwargs, self._kwargsrepr_maxsize, self._repr_maxlevels),
            origin=self._origin,
        )  # fmt: skip
        if headers:
            message_headers.update(headers)  # amqp.send_task_message: headers2.update(headers)
        # The same JSON values kombu's "json" serializer writes, encoded by orjson: JSON encoding
        # was a third of the relay's CPU. Only the whitespace differs; a worker decodes the same.
        payload = self._dumps(body)
        properties["delivery_mode"] = self._delivery_mode
        # Channel.prepare_message, then _inplace_augment_message for the anonymous exchange.
        properties.setdefault("delivery_info", {})
        properties.setdefault("priority", priority)
        properties["body_encoding"] = "base64"
        properties["delivery_tag"] = f"{self._tag_prefix}-{next(self._tags):012x}"
        properties["delivery_info"].update(exchange="", routing_key=self.queue_name)
        message = {
            "body": base64.b64encode(payload).decode("ascii"),  # kombu's Base64 body encoding
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": message_headers,
            "properties": properties,
        }
        return self._queue_key(properties["priority"]), self._dumps(message)

    def _dumps(self, value: Any) -> bytes:
        try:
            return orjson.dumps(value)
        except TypeError:
            return self._encode_json(value).encode()

    def binding_commands(self) -> list[tuple[str, str, str]]:
        """(command, key, member) pairs that declare the queue's binding, as send_task's declare does."""
        return [
            ("sadd", self._prefix + _BINDING_KEY % self._binding_exchange, self._binding_member),
            ("sadd", self._prefix + _PERMANENT_BINDING_KEY % self._binding_exchange, self._binding_member),
        ]

    def queue_keys(self) -> list[str]:
        """Every Redis list the queue's messages can wait in (one per priority step), as workers BRPOP them."""
        return [self._queue_key(step) for step in self._priority_steps]

    @property
    def unacked_key(self) -> str:
        """The hash where kombu keeps the messages workers have taken and not acknowledged."""
        return self._prefix + self._unacked_key

    def _queue_key(self, priority: int) -> str:
        # Channel._get_message_priority clamps to 0..9, then _q_for_pri picks the step's list.
        priority = max(0, min(9, priority))
        step = self._priority_steps[bisect(self._priority_steps, priority) - 1]
        key = f"{self.queue_name}{self._sep}{step}" if step else self.queue_name
        return self._prefix + key
