"""When to retry a task. Pure: no Celery app, no I/O."""

from __future__ import annotations

import smtplib

from celery.exceptions import SoftTimeLimitExceeded

from core import transient


def is_permanent_smtp_error(error: BaseException) -> bool:
    """True for a definite refusal (5xx): sending the same message again would be refused again."""
    if isinstance(error, smtplib.SMTPResponseException):
        return 500 <= error.smtp_code < 600
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        return bool(error.recipients) and all(500 <= code < 600 for code, _ in error.recipients.values())
    return False


def is_transient(error: BaseException) -> bool:
    """True when the error (or one it was raised from) says a dependency is unreachable for now:
    the database (core.transient), the mail server (an OSError, 4xx replies included), or
    prefork's soft time limit (the effect is idempotent, so it runs again). Definite SMTP
    refusals, bugs and constraint violations are not transient."""
    return transient.is_transient(error, also=(SoftTimeLimitExceeded,), permanent=is_permanent_smtp_error)
