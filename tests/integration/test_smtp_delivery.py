"""The SMTP settings and the email's retry policy, as the README promises them, against the real
parts: a worker process (`celery worker`), the session's private Redis as broker, and an aiosmtpd
server that records every session (its login, whether it was upgraded to TLS, its sender).

Short limits keep retries fast: countdowns are at most CELERY_RETRY_BACKOFF_MAX (1 s).
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from celery.result import AsyncResult
from sqlalchemy.ext.asyncio import AsyncEngine

from core.contract import SEND_TRANSACTION_EMAIL
from devservers.embedded import free_port
from tests.support.outbox import OutboxRecord, insert_outbox_row, outbox_rows
from tests.support.waiting import until
from tests.support.workers import RunningWorker, mail_worker
from worker.celery_app import WorkerApp

pytestmark = pytest.mark.e2e

LIMITS: dict[str, Any] = {
    "celery_task_time_limit": 6,
    "celery_task_soft_time_limit": 5,
    "smtp_timeout": 3,
    "celery_visibility_timeout": 20,
    "celery_retry_backoff_max": 1,
}
EMAIL = {"email": "payer@example.com", "amount": "12.50", "status": "SUCCESS"}
USER = "transfers-mailer"
PASSWORD = "s3cret-Pa55word-7f1c"  # distinctive, so that finding it in a log means it leaked
# aiosmtpd warns about a login it accepts in clear; the login tests without STARTTLS mean to.
NO_TLS_WARNING = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")


class Mail(NamedTuple):
    """One MAIL command: the envelope sender, and whether the session was over TLS by then."""

    sender: str
    over_tls: bool


class Login(NamedTuple):
    """One AUTH try: its mechanism, credentials, and whether the session was over TLS by then."""

    mechanism: str
    user: str
    password: str
    over_tls: bool


@dataclass
class RecordingServer:
    """An aiosmtpd handler that records each session's login, MAIL and accepted message.

    The first `drop_first` MAIL commands get no reply: the server drops the connection (before
    any message data, so the sender knows nothing went out). Later ones get `mail_reply`.
    """

    drop_first: int = 0
    mail_reply: str = "250 OK"
    mails: list[Mail] = field(default_factory=list)
    logins: list[Login] = field(default_factory=list)
    messages: list[tuple[str, Message]] = field(default_factory=list)  # (envelope sender, message)
    sessions: int = 0  # sessions that tried to log in or to send
    port: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _seen(self, session: Any) -> None:
        if not getattr(session, "recorded", False):
            session.recorded = True
            self.sessions += 1

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        """Accept USER with PASSWORD, by PLAIN or LOGIN; record every try."""
        assert isinstance(data, LoginPassword)
        login = Login(mechanism, data.login.decode(), data.password.decode(), session.ssl is not None)
        with self._lock:
            self._seen(session)
            self.logins.append(login)
        return AuthResult(success=(login.user, login.password) == (USER, PASSWORD), handled=False)

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str, mail_options: Any) -> str:
        with self._lock:
            self._seen(session)
            self.mails.append(Mail(address, session.ssl is not None))
            drop = len(self.mails) <= self.drop_first
        if drop:
            server.transport.abort()  # no reply: the reply written below goes nowhere
            return "421 never sent"
        if self.mail_reply.startswith("250"):
            envelope.mail_from = address
        return self.mail_reply

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self._lock:
            self.messages.append((envelope.mail_from, message_from_bytes(envelope.content)))
        return "250 OK"

    def attempts(self) -> int:
        """Send attempts that got as far as MAIL."""
        with self._lock:
            return len(self.mails)


@contextmanager
def serving(server: RecordingServer, **smtp_options: Any) -> Iterator[RecordingServer]:
    """Run `server` on 127.0.0.1 for the block; `smtp_options` go to aiosmtpd's SMTP (auth, TLS)."""
    server.port = free_port()
    controller = Controller(server, hostname="127.0.0.1", port=server.port, **smtp_options)
    controller.start()
    try:
        yield server
    finally:
        controller.stop()


class Certificate(NamedTuple):
    cert: Path
    key: Path


OPENSSL_SELF_SIGNED = (
    *("openssl", "req", "-x509", "-nodes", "-days", "2", "-subj", "/CN=test mail server"),
    *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
)


def _self_signed(directory: Path, names: str = "IP:127.0.0.1,DNS:localhost") -> Certificate:
    """A certificate for `names` (the server's, by default), signed by itself: trusted only by
    whoever is told to trust it."""
    directory.mkdir()
    cert, key = directory / "cert.pem", directory / "key.pem"
    command = [*OPENSSL_SELF_SIGNED, "-addext", f"subjectAltName={names}", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(command, check=True, capture_output=True)
    return Certificate(cert, key)


class Certificates(NamedTuple):
    server: Certificate  # the mail server's, for 127.0.0.1
    other: Certificate  # another one for 127.0.0.1
    elsewhere: Certificate  # one for another host's name


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    root = tmp_path_factory.mktemp("certificates")
    return Certificates(
        _self_signed(root / "server"),
        _self_signed(root / "other"),
        _self_signed(root / "elsewhere", "DNS:mail.example"),
    )


def _tls_context(certificate: Certificate) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate.cert, certificate.key)
    return context


def running_worker(
    database_url: str, redis_url: str, server: RecordingServer, env: dict[str, str], **overrides: Any
) -> AbstractContextManager[tuple[WorkerApp, RunningWorker]]:
    """A worker process sending to `server`, with the SMTP_* (and other) variables in `env`."""
    return mail_worker(
        database_url, redis_url, smtp_host="127.0.0.1", smtp_port=server.port, env=env, **{**LIMITS, **overrides}
    )


async def _send(engine: AsyncEngine, client: WorkerApp) -> str:
    """Publish the email task for a fresh outbox row, as the relay does; returns the row's id."""
    outbox_id = await insert_outbox_row(engine, SEND_TRANSACTION_EMAIL, EMAIL)
    client.send_task(SEND_TRANSACTION_EMAIL, kwargs=EMAIL, task_id=outbox_id)
    return outbox_id


async def _row(engine: AsyncEngine, outbox_id: str) -> OutboxRecord:
    (row,) = await outbox_rows(engine, "id = $1::uuid", outbox_id)
    return row


async def _wait_for_state(
    engine: AsyncEngine, outbox_id: str, state: str, worker: RunningWorker, *, seconds: float = 15.0
) -> OutboxRecord:
    """Wait until the worker leaves the outbox row in `state` (completed or failed): fail as soon as
    it ends in the other one, or when `seconds` pass."""

    async def reached() -> OutboxRecord | None:
        row = await _row(engine, outbox_id)
        if row.state != state and row.state in ("completed", "failed"):
            raise AssertionError(f"outbox row not {state!r} (it is {row}); worker log:\n{worker.log()[-4000:]}")
        return row if row.state == state else None

    return await until(reached, seconds, f"outbox row {state!r}")


def _secret_forms(password: str) -> list[str]:
    """The password as it could leak: plain, or base64 as AUTH LOGIN sends it."""
    return [password, base64.b64encode(password.encode()).decode()]


async def test_the_email_is_sent_from_smtp_from(database_url: str, redis_url: str, engine: AsyncEngine) -> None:
    sender = "payments-desk@bank.example"
    with (
        serving(RecordingServer()) as server,
        running_worker(database_url, redis_url, server, {"SMTP_FROM": sender}) as (client, worker),
    ):
        outbox_id = await _send(engine, client)
        await _wait_for_state(engine, outbox_id, "completed", worker)
    [(envelope_sender, message)] = server.messages
    assert message["From"] == sender
    assert envelope_sender == sender
    assert message["To"] == EMAIL["email"]


@NO_TLS_WARNING
async def test_the_worker_logs_in_with_smtp_user_and_password(
    database_url: str, redis_url: str, engine: AsyncEngine
) -> None:
    # auth_required: the server refuses MAIL from a session that has not logged in.
    server = RecordingServer()
    with serving(server, auth_required=True, auth_require_tls=False, authenticator=server.authenticate):
        env = {"SMTP_USER": USER, "SMTP_PASSWORD": PASSWORD}
        with running_worker(database_url, redis_url, server, env) as (client, worker):
            outbox_id = await _send(engine, client)
            await _wait_for_state(engine, outbox_id, "completed", worker)
            log = worker.log()
    assert [(login.user, login.password) for login in server.logins] == [(USER, PASSWORD)]
    assert len(server.messages) == 1
    for secret in _secret_forms(PASSWORD):
        assert secret not in log, "the SMTP password is in the worker's log"


@NO_TLS_WARNING
async def test_a_wrong_password_fails_at_once_without_retry(
    database_url: str, redis_url: str, engine: AsyncEngine
) -> None:
    # The server answers 535 (a 5xx): the README's retry policy fails SMTP 5xx at once. Two
    # retries are allowed, so a retry would show as more than one session.
    wrong = "not-the-Pa55word-93ad"
    server = RecordingServer()
    with serving(server, auth_required=True, auth_require_tls=False, authenticator=server.authenticate):
        env = {"SMTP_USER": USER, "SMTP_PASSWORD": wrong}
        with running_worker(database_url, redis_url, server, env, celery_task_max_retries=2) as (client, worker):
            outbox_id = await _send(engine, client)
            row = await _wait_for_state(engine, outbox_id, "failed", worker)
            task_state = AsyncResult(outbox_id, app=client).state
            log = worker.log()
    assert server.logins, "the worker did not try to log in"
    assert {(login.user, login.password) for login in server.logins} == {(USER, wrong)}
    assert server.sessions == 1, f"an authentication failure was retried:\n{log}"
    assert server.attempts() == 0
    assert row.last_error is not None
    assert "PermanentDeliveryError" in row.last_error
    assert "535" in row.last_error
    assert task_state == "FAILURE"
    assert "transient failure" not in log
    for secret in _secret_forms(wrong):
        assert secret not in log, "the SMTP password is in the worker's log"


async def test_starttls_upgrades_the_session_before_login_and_mail(
    database_url: str, redis_url: str, engine: AsyncEngine, certificates: Certificates
) -> None:
    # require_starttls: nothing but EHLO, NOOP and STARTTLS before TLS. auth_require_tls (the
    # default): no login in clear either. The worker trusts the server's certificate (SSL_CERT_FILE).
    served = certificates.server
    server = RecordingServer()
    with serving(
        server,
        tls_context=_tls_context(served),
        require_starttls=True,
        auth_required=True,
        authenticator=server.authenticate,
    ):
        env = {"SMTP_STARTTLS": "true", "SSL_CERT_FILE": str(served.cert), "SMTP_USER": USER, "SMTP_PASSWORD": PASSWORD}
        with running_worker(database_url, redis_url, server, env) as (client, worker):
            outbox_id = await _send(engine, client)
            await _wait_for_state(engine, outbox_id, "completed", worker)
    assert [mail.over_tls for mail in server.mails] == [True]
    assert [(login.user, login.password, login.over_tls) for login in server.logins] == [(USER, PASSWORD, True)]
    assert len(server.messages) == 1


@pytest.mark.parametrize(
    ("served", "trusted"),
    [
        pytest.param("server", "other", id="a certificate the worker does not trust"),
        pytest.param("elsewhere", "elsewhere", id="a trusted certificate for another host"),
    ],
)
async def test_starttls_refuses_a_certificate_it_cannot_verify(
    database_url: str, redis_url: str, engine: AsyncEngine, certificates: Certificates, served: str, trusted: str
) -> None:
    # The worker trusts a certificate (SSL_CERT_FILE), just not this one for 127.0.0.1: the send
    # must fail in the handshake. No retries (CELERY_TASK_MAX_RETRIES=0): whether a handshake
    # failure is worth retrying is not what this test is about.
    server = RecordingServer()
    with serving(server, tls_context=_tls_context(certificates._asdict()[served]), require_starttls=True):
        env = {"SMTP_STARTTLS": "true", "SSL_CERT_FILE": str(certificates._asdict()[trusted].cert)}
        with running_worker(database_url, redis_url, server, env, celery_task_max_retries=0) as (client, worker):
            outbox_id = await _send(engine, client)
            row = await _wait_for_state(engine, outbox_id, "failed", worker)
    assert server.messages == []
    assert server.attempts() == 0, "the worker sent MAIL to a server it does not trust"
    assert row.last_error is not None
    assert "SSLCertVerificationError" in row.last_error


async def test_a_dropped_connection_is_retried_until_the_email_is_sent_once(
    database_url: str, redis_url: str, engine: AsyncEngine
) -> None:
    # The server drops the first two sends before their data; the third, the last retry the
    # budget (2) allows, is accepted.
    max_retries = 2
    with serving(RecordingServer(drop_first=max_retries)) as server:
        overrides = {"celery_task_max_retries": max_retries}
        with running_worker(database_url, redis_url, server, {}, **overrides) as (client, worker):
            outbox_id = await _send(engine, client)
            await _wait_for_state(engine, outbox_id, "completed", worker)
            log = worker.log()
    assert len(server.messages) == 1, "the email did not arrive exactly once"
    assert server.attempts() == max_retries + 1
    for retry in range(1, max_retries + 1):
        assert f"transient failure, retry {retry}/{max_retries}" in log
    assert log.count("SMTPServerDisconnected") >= max_retries


async def test_a_task_that_keeps_failing_is_retried_max_retries_times_then_failed_and_left_alone(
    database_url: str, redis_url: str, engine: AsyncEngine
) -> None:
    max_retries = 2
    with serving(RecordingServer(mail_reply="451 4.3.0 try again later")) as server:
        overrides = {"celery_task_max_retries": max_retries}
        with running_worker(database_url, redis_url, server, {}, **overrides) as (client, worker):
            outbox_id = await _send(engine, client)
            row = await _wait_for_state(engine, outbox_id, "failed", worker)
            attempts = server.attempts()
            # Absence over a stated period: any further attempt would come within one countdown
            # (at most CELERY_RETRY_BACKOFF_MAX, 1 s); watch for three.
            await asyncio.sleep(3)
            log = worker.log()
            task_state = AsyncResult(outbox_id, app=client).state
            after = await _row(engine, outbox_id)
    assert attempts == max_retries + 1
    assert server.attempts() == attempts, "the task was attempted again after it failed"
    assert log.count("transient failure") == max_retries
    assert f"retries used up ({max_retries})" in log
    assert row.last_error is not None
    assert "SMTPSenderRefused" in row.last_error
    assert "451" in row.last_error
    assert after == row
    assert task_state == "FAILURE"
    assert server.messages == []
