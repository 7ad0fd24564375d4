"""Sending the transfer notification: over SMTP when SMTP_HOST is set, else simulated."""

from __future__ import annotations

import contextlib
import smtplib
import ssl
import time
from email.message import EmailMessage

from core.settings import Settings, reveal


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


def send_email(settings: Settings, message: EmailMessage) -> None:
    """Deliver the message, or sleep EMAIL_SEND_DELAY seconds when no SMTP server is configured.

    Every SMTP socket operation is bounded by SMTP_TIMEOUT: the threads pool cannot enforce
    the task's hard time limit, so the send must bound itself. Raises OSError or
    smtplib.SMTPException (see worker.retry for which are worth retrying).
    """
    if not settings.smtp_host:
        time.sleep(settings.email_send_delay)
        return
    smtp = smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=settings.smtp_timeout)
    try:
        if settings.smtp_starttls:
            smtp.starttls(context=ssl.create_default_context())
        if settings.smtp_user:
            smtp.login(settings.smtp_user, reveal(settings.smtp_password) or "")
        smtp.send_message(message)
        # The server has accepted the message: a failing QUIT must not make us send it again.
        with contextlib.suppress(smtplib.SMTPException, OSError):
            smtp.quit()
    finally:
        # Not `with SMTP(...)`: its exit sends QUIT even after an error, and a reply left
        # unread by the error then surfaces as a confusing exception that hides the real one.
        smtp.close()
