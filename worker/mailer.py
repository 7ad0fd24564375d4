"""Sending the transfer notification: over SMTP when SMTP_HOST is set, else simulated."""

from __future__ import annotations

import asyncio
import contextlib
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from email.message import EmailMessage
from functools import partial
from typing import Any

from core.settings import Settings, reveal
from worker.errors import DeliveryUncertain, SendDeadlineExceeded


def build_message(settings: Settings, *, task_id: str, email: str, amount: str, status: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = settings.smtp_from
    message["To"] = email
    # Header values may not span lines; the status is free text from the message.
    message["Subject"] = " ".join(f"Transfer {status}: {amount}".split())
    # A stable Message-ID per task: if a crash ever makes us send twice, mail systems that
    # deduplicate by Message-ID show the reader one email.
    message["Message-ID"] = f"<{task_id}@outbox-transfers>"
    message.set_content(f"Your transfer of {amount} is {status}.\n\nReference: {task_id}\n")
    return message


class _TrackedSMTP(smtplib.SMTP):
    """smtplib.SMTP that remembers whether the message data may have reached the server, and the
    host it connected to."""

    data_started = False

    def connect(self, host: str = "localhost", port: int = 0, source_address: Any = None) -> tuple[int, bytes]:
        # starttls() verifies the certificate against the host given to __init__, which connects at
        # once; we connect later (the watchdog must be running first), so keep the host here, or
        # every STARTTLS fails with "check_hostname requires server_hostname".
        self._host = host
        return super().connect(host, port, source_address)

    def data(self, msg: Any) -> tuple[int, bytes]:
        self.data_started = True
        return super().data(msg)


def send_email(settings: Settings, compose: Callable[[], EmailMessage], *, deadline: float) -> None:
    """Deliver the message `compose()` builds, or sleep EMAIL_SEND_DELAY seconds when no SMTP
    server is configured. The message is built only to be sent: building it (the email package
    parses every header) costs more CPU than the rest of the task's own work.

    The whole send ends by `deadline` (a time.monotonic() value): every socket operation is
    bounded by the time left (and by SMTP_TIMEOUT), and a watchdog shuts the connection at the
    deadline, so a server that answers each step just in time cannot stretch the send past the
    lease taken for it. The threads pool cannot enforce the task's time limit, so the send must
    bound itself.

    Raises SendDeadlineExceeded, OSError or smtplib.SMTPException (see worker.retry for which are
    worth retrying); DeliveryUncertain when the failure came after the message data went out, so
    that the server may have accepted it.
    """
    if not settings.smtp_host:
        pause, error = _simulated_send(settings, deadline)
        if pause:
            time.sleep(pause)
        if error is not None:
            raise error
        return
    message = compose()
    smtp = _TrackedSMTP(timeout=_step_timeout(settings, deadline))
    expired = threading.Event()
    watchdog = threading.Timer(max(deadline - time.monotonic(), 0.0), _abort, (smtp, expired))
    watchdog.daemon = True
    watchdog.start()
    try:
        _converse(settings, smtp, message, deadline)
    except Exception as error:
        classified = _classified(error, smtp, expired.is_set() or time.monotonic() >= deadline)
        if classified is error:
            raise
        raise classified from error
    finally:
        watchdog.cancel()
        # Not `with SMTP(...)`: its exit sends QUIT even after an error, and a reply left
        # unread by the error then surfaces as a confusing exception that hides the real one.
        smtp.close()


async def send_email_async(settings: Settings, compose: Callable[[], EmailMessage], *, deadline: float) -> None:
    """send_email for a coroutine: the simulated send is awaited; an SMTP conversation (smtplib
    blocks) runs in a thread of the loop's executor. Same bounds, same errors."""
    if not settings.smtp_host:
        pause, error = _simulated_send(settings, deadline)
        if pause:
            await asyncio.sleep(pause)
        if error is not None:
            raise error
        return
    await asyncio.get_running_loop().run_in_executor(None, partial(send_email, settings, compose, deadline=deadline))


def _simulated_send(settings: Settings, deadline: float) -> tuple[float, SendDeadlineExceeded | None]:
    """How long the simulated send takes, and its error if it would outlast `deadline`."""
    left = deadline - time.monotonic()
    if settings.email_send_delay > left:
        return max(left, 0.0), SendDeadlineExceeded(
            f"the simulated send ({settings.email_send_delay}s) outlasts its deadline"
        )
    return settings.email_send_delay, None


def _converse(settings: Settings, smtp: _TrackedSMTP, message: EmailMessage, deadline: float) -> None:
    assert settings.smtp_host is not None
    smtp.connect(settings.smtp_host, settings.smtp_port)
    steps: list[Any] = []
    if settings.smtp_starttls:
        steps.append(lambda: smtp.starttls(context=ssl.create_default_context()))
    if settings.smtp_user:
        steps.append(lambda: smtp.login(settings.smtp_user or "", reveal(settings.smtp_password) or ""))
    steps.append(lambda: smtp.send_message(message))
    for step in steps:
        if smtp.sock is not None:
            smtp.sock.settimeout(_step_timeout(settings, deadline))
        step()
    # The server has accepted the message: a failing QUIT must not make us send it again.
    with contextlib.suppress(smtplib.SMTPException, OSError):
        smtp.quit()


def _step_timeout(settings: Settings, deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise SendDeadlineExceeded("no time left before the send's deadline")
    return min(settings.smtp_timeout, left)


def _abort(smtp: _TrackedSMTP, expired: threading.Event) -> None:
    expired.set()
    sock = smtp.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _classified(error: Exception, smtp: _TrackedSMTP, expired: bool) -> Exception:
    # Past the deadline, whichever bound fired (a step's timeout, cut to the time left, or the
    # watchdog), the failure is the deadline's.
    if expired and not isinstance(error, SendDeadlineExceeded):
        error = SendDeadlineExceeded(f"the send did not finish by its deadline ({type(error).__name__}: {error})")
    # A reply from the server (2xx-5xx) settles the outcome; a broken or silent connection after
    # the data went out does not.
    if smtp.data_started and not isinstance(error, smtplib.SMTPResponseException):
        return DeliveryUncertain(f"the mail server may have accepted the message: {type(error).__name__}: {error}")
    return error
