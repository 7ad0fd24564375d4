"""A real SMTP server for the tests (aiosmtpd) that keeps what it receives."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from typing import Any

from aiosmtpd.controller import Controller

from devservers.embedded import free_port
from tests.support.waiting import wait_until

_BIND_ATTEMPTS = 5


@dataclass
class SmtpSink:
    """What the sink accepted. A message counts only once the client had its 250 reply sent."""

    host: str
    port: int
    reply_delay: float = 0.0
    reply: str = "250 OK"
    step_delay: float = 0.0  # held before answering MAIL and RCPT, for the first `slow_sessions` senders
    slow_sessions: int = 0
    refuse_first: int = 0  # the first this many messages get a temporary refusal (451) instead of `reply`
    messages: list[Message] = field(default_factory=list)
    started: int = 0  # messages whose data arrived, replied to or not
    mails: int = 0  # MAIL commands received: one per send attempt that got that far
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.messages)

    def received(self, *, message_id: str | None = None) -> list[Message]:
        with self._lock:
            return [m for m in self.messages if message_id is None or m["Message-ID"] == message_id]

    def wait_for(self, count: int, *, timeout: float = 15.0) -> None:
        wait_until(lambda: self.count >= count, timeout, f"{count} emails (got {self.count})")

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str, mail_options: Any) -> str:
        with self._lock:
            self.mails += 1
            slow = self.mails <= self.slow_sessions
        if slow:
            session.slow = True
            await asyncio.sleep(self.step_delay)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any) -> str:
        if getattr(session, "slow", False):
            await asyncio.sleep(self.step_delay)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        # A client that goes away during the delay cancels this coroutine (aiosmtpd does so
        # on connection loss), so a killed sender's message is never counted.
        with self._lock:
            self.started += 1
            refused = self.started <= self.refuse_first
        if self.reply_delay:
            await asyncio.sleep(self.reply_delay)
        if refused:
            return "451 4.3.0 try again later"
        if self.reply.startswith("250"):
            with self._lock:
                self.messages.append(message_from_bytes(envelope.content))
        return self.reply


@contextmanager
def smtp_sink(
    *,
    reply_delay: float = 0.0,
    reply: str = "250 OK",
    step_delay: float = 0.0,
    slow_sessions: int = 0,
    refuse_first: int = 0,
) -> Iterator[SmtpSink]:
    """Run an SMTP server on 127.0.0.1 for the duration of the block; yield what it received.

    `reply_delay` holds the reply to each message for that many seconds, to catch a sender
    in the middle of a send; `reply` is the answer to every message (a 5xx refuses it).
    `step_delay` holds the answers to MAIL and RCPT of the first `slow_sessions` sends (a server
    slow at every step, each step within the client's timeout); `refuse_first` answers the first
    messages with a temporary refusal (451).
    """
    for attempt in range(_BIND_ATTEMPTS):
        sink = SmtpSink("127.0.0.1", free_port(), reply_delay, reply, step_delay, slow_sessions, refuse_first)
        controller = Controller(sink, hostname=sink.host, port=sink.port)
        try:
            controller.start()
            break
        except OSError:  # another process took the port between picking and binding it
            if attempt == _BIND_ATTEMPTS - 1:
                raise
    try:
        yield sink
    finally:
        controller.stop()
