"""When to retry a task, and how long to wait. Pure: no Celery, no I/O."""

from __future__ import annotations

import random
import smtplib

import asyncpg
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import exc as sa_exc

# Errors of an unreachable or overloaded dependency: the same call can succeed later.
_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    OSError,  # refused/reset connections, DNS, socket timeouts; smtplib.SMTPException is one too
    TimeoutError,  # also the worker's own bound on a database call
    SoftTimeLimitExceeded,  # prefork's soft limit: the effect is idempotent, so run it again
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,  # no pooled connection free in time
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.QueryCanceledError,  # statement_timeout
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.InterfaceError,
)


def is_permanent_smtp_error(error: BaseException) -> bool:
    """True for a definite refusal (5xx): sending the same message again would be refused again."""
    if isinstance(error, smtplib.SMTPResponseException):
        return 500 <= error.smtp_code < 600
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        return bool(error.recipients) and all(500 <= code < 600 for code, _ in error.recipients.values())
    return False


def is_transient(error: BaseException) -> bool:
    """True when the error (or one it was raised from) says a dependency is unreachable for now.

    Bugs, constraint violations and definite SMTP refusals are not transient: retrying them
    only delays the visible failure.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if is_permanent_smtp_error(current):
            return False
        if isinstance(current, _TRANSIENT_TYPES):
            return True
        if isinstance(current, sa_exc.DBAPIError) and current.connection_invalidated:
            return True
        current = current.__cause__ or current.__context__
    return False


def backoff_delay(retries: int, *, cap: float, base: float = 1.0, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number `retries + 1`: exponential, capped, with jitter.

    "Equal jitter": half of the exponential step is fixed, half random, so retries of many
    tasks that failed together (a database restart) spread out instead of arriving at once,
    yet each still waits at least half its step. Always within [0, cap].
    """
    step = min(cap, base * 2.0 ** max(0, retries))
    draw = (rng or random).random()
    return step / 2 + step / 2 * draw
