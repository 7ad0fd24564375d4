"""Which failures are worth a retry: core/transient.py for every process, worker/retry.py for tasks."""

from __future__ import annotations

import smtplib
import socket

import asyncpg
import pytest
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import exc as sa_exc

from core import transient
from worker.retry import is_permanent_smtp_error, is_transient


class _Statement(Exception):
    pass


@pytest.mark.parametrize(
    ("code", "permanent"),
    [(421, False), (450, False), (499, False), (500, True), (550, True), (599, True), (600, False)],
)
def test_an_smtp_reply_is_permanent_only_in_the_5xx_range(code: int, permanent: bool) -> None:
    assert is_permanent_smtp_error(smtplib.SMTPResponseException(code, b"reply")) is permanent
    assert is_permanent_smtp_error(smtplib.SMTPDataError(code, b"reply")) is permanent


@pytest.mark.parametrize(
    ("codes", "permanent"),
    [
        ([550], True),
        ([500], True),
        ([599], True),
        ([550, 553], True),
        ([499], False),
        ([600], False),
        ([550, 450], False),
        ([450], False),
        ([], False),
    ],
)
def test_refused_recipients_are_permanent_only_if_every_one_got_a_5xx(codes: list[int], permanent: bool) -> None:
    recipients = {f"r{i}@example.com": (code, b"no") for i, code in enumerate(codes)}
    assert is_permanent_smtp_error(smtplib.SMTPRecipientsRefused(recipients)) is permanent


def test_other_errors_are_not_smtp_refusals() -> None:
    assert is_permanent_smtp_error(ConnectionRefusedError()) is False
    assert is_permanent_smtp_error(ValueError("550")) is False


DATABASE_TRANSIENT = [
    ConnectionRefusedError(),
    ConnectionResetError(),
    TimeoutError(),
    OSError("network unreachable"),
    asyncpg.PostgresConnectionError(),
    asyncpg.CannotConnectNowError(),
    asyncpg.InterfaceError("connection is closed"),
    asyncpg.InternalClientError(),
    asyncpg.AdminShutdownError(),
    asyncpg.IdleInTransactionSessionTimeoutError(),
    asyncpg.TooManyConnectionsError(),
    asyncpg.QueryCanceledError(),
    asyncpg.LockNotAvailableError(),
    asyncpg.DeadlockDetectedError(),
    asyncpg.SerializationError(),
    sa_exc.OperationalError("SELECT 1", {}, _Statement()),
    sa_exc.InterfaceError("SELECT 1", {}, _Statement()),
    sa_exc.TimeoutError(),
]
NOT_TRANSIENT = [
    ValueError("bad"),
    KeyError("x"),
    TypeError("bug"),
    asyncpg.UniqueViolationError(),
    sa_exc.IntegrityError("INSERT", {}, _Statement()),
]


@pytest.mark.parametrize("error", DATABASE_TRANSIENT, ids=lambda error: type(error).__name__)
def test_an_unreachable_or_busy_database_is_transient_everywhere(error: BaseException) -> None:
    assert transient.is_transient(error) is True
    assert is_transient(error) is True


@pytest.mark.parametrize("error", NOT_TRANSIENT, ids=lambda error: type(error).__name__)
def test_bugs_and_constraint_violations_are_not_transient(error: BaseException) -> None:
    assert transient.is_transient(error) is False
    assert is_transient(error) is False


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.PostgresConnectionError(),
        asyncpg.InterfaceError("closed"),
        asyncpg.InternalClientError(),
        asyncpg.AdminShutdownError(),
        asyncpg.IdleInTransactionSessionTimeoutError(),
        OSError(),
        TimeoutError(),
    ],
    ids=lambda error: type(error).__name__,
)
def test_connection_errors_are_the_ones_that_break_the_connection(error: BaseException) -> None:
    assert isinstance(error, transient.CONNECTION_ERRORS)


@pytest.mark.parametrize(
    "error",
    [asyncpg.TooManyConnectionsError(), asyncpg.LockNotAvailableError(), asyncpg.DeadlockDetectedError()],
    ids=lambda error: type(error).__name__,
)
def test_a_passing_condition_leaves_the_connection_usable(error: BaseException) -> None:
    assert not isinstance(error, transient.CONNECTION_ERRORS)


@pytest.mark.parametrize(
    "error",
    [
        socket.timeout(),  # noqa: UP041 - the name smtplib and redis raise
        smtplib.SMTPServerDisconnected("gone"),
        smtplib.SMTPConnectError(421, b"busy"),
        smtplib.SMTPResponseException(421, b"try later"),
        smtplib.SMTPRecipientsRefused({"a@example.com": (450, b"greylisted")}),
        SoftTimeLimitExceeded(),
    ],
    ids=lambda error: type(error).__name__,
)
def test_a_task_retries_mail_server_trouble_and_its_soft_time_limit(error: BaseException) -> None:
    assert is_transient(error) is True


def test_only_the_worker_counts_its_soft_time_limit() -> None:
    assert transient.is_transient(SoftTimeLimitExceeded()) is False
    assert transient.is_transient(SoftTimeLimitExceeded(), also=(SoftTimeLimitExceeded,)) is True


@pytest.mark.parametrize(
    "error",
    [
        smtplib.SMTPResponseException(550, b"mailbox unavailable"),
        smtplib.SMTPDataError(554, b"rejected"),
        smtplib.SMTPRecipientsRefused({"a@example.com": (550, b"no")}),
        smtplib.SMTPSenderRefused(553, b"bad sender", "from@example.com"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_a_definite_smtp_refusal_is_not_retried_though_it_is_an_oserror(error: BaseException) -> None:
    assert isinstance(error, OSError)
    assert is_transient(error) is False


def _raised_from(error: BaseException, cause: BaseException, *, explicit: bool) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as inner:
            if explicit:
                raise error from inner  # __cause__
            raise error  # noqa: B904 - implicit on purpose: only __context__ links them
    except BaseException as outer:
        return outer


@pytest.mark.parametrize("explicit", [True, False], ids=["from", "during"])
def test_an_error_raised_from_a_transient_one_is_transient(explicit: bool) -> None:
    wrapped = _raised_from(RuntimeError("wrapper"), ConnectionResetError(), explicit=explicit)
    assert transient.is_transient(wrapped) is True
    assert is_transient(wrapped) is True


def test_the_first_cause_that_is_either_permanent_or_transient_decides() -> None:
    transient_outside = _raised_from(OSError("wrapper"), smtplib.SMTPResponseException(550, b"no"), explicit=True)
    assert is_transient(transient_outside) is True
    refusal_outside = _raised_from(smtplib.SMTPResponseException(550, b"no"), ConnectionResetError(), explicit=True)
    assert is_transient(refusal_outside) is False
    bug_then_refusal = _raised_from(ValueError("bug"), smtplib.SMTPResponseException(550, b"no"), explicit=False)
    assert is_transient(bug_then_refusal) is False


def test_a_cause_wins_over_a_context() -> None:
    error = RuntimeError("outer")
    error.__cause__ = ValueError("cause")
    error.__context__ = ConnectionResetError()
    assert transient.is_transient(error) is False
    error.__cause__, error.__context__ = ConnectionResetError(), ValueError("context")
    assert transient.is_transient(error) is True


def test_an_invalidated_connection_is_transient_whatever_its_error() -> None:
    invalidated = sa_exc.DBAPIError("SELECT 1", {}, _Statement(), connection_invalidated=True)
    still_valid = sa_exc.DBAPIError("SELECT 1", {}, _Statement(), connection_invalidated=False)
    assert transient.is_transient(invalidated) is True
    assert transient.is_transient(still_valid) is False


def test_a_cycle_in_the_chain_ends() -> None:
    first, second = ValueError("a"), ValueError("b")
    first.__context__, second.__context__ = second, first
    assert transient.is_transient(first) is False


def test_a_cycle_through_a_transient_error_finds_it() -> None:
    first, second = ValueError("a"), ConnectionResetError()
    first.__context__, second.__context__ = second, first
    assert transient.is_transient(first) is True
