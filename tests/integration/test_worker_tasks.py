"""The tasks run in-process (Celery's eager `apply`) against the real test database.

Properties of every task call: its log line holds its inputs, its result has the documented
shape and its own task id, its effect happens once per task id, and bad arguments fail at
once without a retry and mark the outbox row failed. Transient failures are retried, then
fail visibly. Delays are 0 here except in the two timing tests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from functools import partial
from typing import Any

import asyncpg
import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from core.contract import AUDIT_LOG_TRANSACTION, SEND_TRANSACTION_EMAIL, TransferFacts, transfer_messages
from core.settings import Settings
from tests.support.outbox import OutboxRecord, insert_outbox_row, outbox_rows_now
from tests.support.smtp import smtp_sink
from tests.support.workers import worker_settings
from worker.celery_app import WorkerApp, create_celery_app
from worker.effects import claim_email_lease, record_email_sent, release_email_lease
from worker.errors import DeliveryUncertain, InvalidTaskArguments, PermanentDeliveryError, SendDeadlineExceeded
from worker.mailer import build_message, send_email

EXAMPLES = hypothesis_settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
TASK_LOGGER = "worker.tasks"


def _build_app(settings: Settings) -> Iterator[WorkerApp]:
    app = create_celery_app(settings)
    try:
        yield app
    finally:
        app.context.database.close()


@pytest.fixture(scope="module")
def app(database_url: str, redis_url: str) -> Iterator[WorkerApp]:
    yield from _build_app(worker_settings(database_url, redis_url))


def query(app: WorkerApp, sql: str, **params: Any) -> list[Any]:
    async def run() -> list[Any]:
        engine = create_async_engine(app.context.settings.async_database_url, poolclass=NullPool)
        try:
            async with engine.begin() as connection:
                return list((await connection.execute(text(sql), params)).all())
        finally:
            await engine.dispose()

    return asyncio.run(run())


def insert_row(app: WorkerApp, task_name: str, kwargs: dict[str, Any]) -> str:
    """A published outbox row in the app's database; its id is the task id."""
    return asyncio.run(insert_outbox_row(app.context.settings.async_database_url, task_name, kwargs))


def outbox_row(app: WorkerApp, outbox_id: str) -> OutboxRecord:
    (row,) = outbox_rows_now(app.context.settings.async_database_url, "id = $1::uuid", outbox_id)
    return row


def _accepted_by_the_api(email: str) -> bool:
    # Only addresses the API lets an account have can reach a task (the same validator).
    try:
        validate_email(email, check_deliverability=False)
    except EmailNotValidError:
        return False
    return True


emails = st.builds(
    "{}@{}.{}".format,
    st.from_regex(r"[a-z0-9]{1,12}([._+-][a-z0-9]{1,8}){0,2}", fullmatch=True),
    st.from_regex(r"[a-z][a-z0-9-]{0,12}[a-z0-9]", fullmatch=True),
    st.sampled_from(["com", "org", "net", "io"]),
).filter(_accepted_by_the_api)
amounts = st.decimals(min_value=0, max_value=10**12, places=2).map(str)
safe_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=30)
statuses = safe_text.filter(bool)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**15), 10**15) | safe_text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(safe_text, children, max_size=3),
    max_leaves=10,
)
audit_data = st.dictionaries(safe_text, json_values, max_size=5)


def _our_records(caplog: pytest.LogCaptureFixture, task_id: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == TASK_LOGGER and getattr(r, "task_id", None) == task_id]


@given(email=emails, amount=amounts, status=statuses)
@EXAMPLES
def test_email_task_logs_its_inputs_at_debug_only_and_returns_its_own_id(
    app: WorkerApp, caplog: pytest.LogCaptureFixture, email: str, amount: str, status: str
) -> None:
    caplog.set_level(logging.DEBUG, logger=TASK_LOGGER)
    outbox_id = insert_row(app, SEND_TRANSACTION_EMAIL, {"email": email, "amount": amount, "status": status})
    outcome = app.tasks[SEND_TRANSACTION_EMAIL].apply(
        kwargs={"email": email, "amount": amount, "status": status}, task_id=outbox_id
    )
    assert outcome.status == "SUCCESS", outcome.traceback
    assert set(outcome.result) == {"success", "message", "task_id"}
    assert outcome.result["success"] is True
    assert outcome.result["task_id"] == outbox_id
    assert outcome.result["message"] == f"Transfer notification sent to {email}"
    # The run's INFO line (worker.observability) names the task; the inputs, the address among them
    # (personal data), are logged at DEBUG only.
    (record,) = _our_records(caplog, outbox_id)
    assert record.levelno == logging.DEBUG
    assert all(value in record.getMessage() for value in (email, amount, status))
    assert outbox_row(app, outbox_id).state == "completed"


@given(transaction_id=statuses, data=audit_data)
@EXAMPLES
def test_audit_task_logs_its_inputs_at_debug_only_and_returns_its_own_id(
    app: WorkerApp, caplog: pytest.LogCaptureFixture, transaction_id: str, data: dict[str, Any]
) -> None:
    caplog.set_level(logging.DEBUG, logger=TASK_LOGGER)
    outbox_id = insert_row(app, AUDIT_LOG_TRANSACTION, {"transaction_id": transaction_id, "data": data})
    outcome = app.tasks[AUDIT_LOG_TRANSACTION].apply(
        kwargs={"transaction_id": transaction_id, "data": data}, task_id=outbox_id
    )
    assert outcome.status == "SUCCESS", outcome.traceback
    assert outcome.result == {
        "success": True,
        "message": f"Audit log written for transaction {transaction_id}",
        "task_id": outbox_id,
        "transaction_id": transaction_id,
    }
    # The transaction and the whole record are logged at DEBUG only (a line per task costs CPU).
    (debug,) = _our_records(caplog, outbox_id)
    assert debug.levelno == logging.DEBUG
    assert transaction_id in debug.getMessage()
    assert getattr(debug, "transaction_id", None) == transaction_id
    assert json.dumps(data, sort_keys=True, default=str) in debug.getMessage()
    rows = query(app, "SELECT transaction_id, data FROM audit_log WHERE task_id = :id", id=outbox_id)
    assert [(row.transaction_id, row.data) for row in rows] == [(transaction_id, data)]
    assert outbox_row(app, outbox_id).state == "completed"


def _bad_email_arguments() -> st.SearchStrategy[dict[str, Any]]:
    good = {"email": "a@example.com", "amount": "10.00", "status": "SUCCESS"}
    broken_values = {
        "email": st.sampled_from(["", "not-an-email", "a@", "@b.com", 42, None]),
        "amount": st.sampled_from(["ten", "", "1e", "NaN", "Infinity", "-5", 12.5, 10, None, [1]]),
        "status": st.sampled_from(["", 1, None, {"s": 1}]),
    }
    wrong_value = st.sampled_from(sorted(good)).flatmap(
        lambda key: broken_values[key].map(lambda value: {**good, key: value})
    )
    missing_key = st.sampled_from(sorted(good)).map(lambda key: {k: v for k, v in good.items() if k != key})
    extra_key = st.just({**good, "unexpected": 1})
    return wrong_value | missing_key | extra_key


def _bad_audit_arguments() -> st.SearchStrategy[dict[str, Any]]:
    good: dict[str, Any] = {"transaction_id": "t-1", "data": {"amount": "1.00"}}
    return st.sampled_from(
        [
            {"data": {}},
            {"transaction_id": "t-1"},
            {**good, "transaction_id": 7},
            {**good, "transaction_id": ""},
            {**good, "data": "not a dict"},
            {**good, "data": [1, 2]},
            {**good, "extra": True},
        ]
    )


@given(
    case=st.one_of(
        _bad_email_arguments().map(lambda kwargs: (SEND_TRANSACTION_EMAIL, kwargs)),
        _bad_audit_arguments().map(lambda kwargs: (AUDIT_LOG_TRANSACTION, kwargs)),
    )
)
@EXAMPLES
def test_bad_arguments_fail_at_once_and_mark_the_row_failed(
    app: WorkerApp, caplog: pytest.LogCaptureFixture, case: tuple[str, dict[str, Any]]
) -> None:
    caplog.set_level(logging.INFO, logger=TASK_LOGGER)
    task_name, kwargs = case
    outbox_id = insert_row(app, task_name, {"as": "published"})
    outcome = app.tasks[task_name].apply(kwargs=kwargs, task_id=outbox_id)
    assert outcome.status == "FAILURE"
    assert isinstance(outcome.result, InvalidTaskArguments)
    assert not [r for r in _our_records(caplog, outbox_id) if "retry" in r.getMessage()]
    row = outbox_row(app, outbox_id)
    assert row.state == "failed"
    assert str(row.last_error).startswith("InvalidTaskArguments: invalid arguments")


def test_positional_arguments_are_refused(app: WorkerApp) -> None:
    outcome = app.tasks[AUDIT_LOG_TRANSACTION].apply(args=("t-1", {}), task_id=str(uuid.uuid4()))
    assert outcome.status == "FAILURE"
    assert isinstance(outcome.result, InvalidTaskArguments)


@given(
    amount=st.decimals(min_value=Decimal("0.01"), max_value=Decimal("1000000"), places=2),
    email=emails,
    status=st.sampled_from(["SUCCESS", "PENDING"]),
)
@EXAMPLES
def test_every_outbox_payload_is_json_and_accepted_by_its_task(
    app: WorkerApp, amount: Decimal, email: str, status: str
) -> None:
    from datetime import UTC, datetime

    facts = TransferFacts(uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), amount, "EUR", status, datetime.now(UTC), email)
    for message in transfer_messages(facts):
        kwargs = json.loads(json.dumps(message.kwargs))  # what the broker carries
        assert kwargs == message.kwargs
        outcome = app.tasks[message.task_name].apply(kwargs=kwargs, task_id=str(uuid.uuid4()))
        assert outcome.status == "SUCCESS", outcome.traceback


def test_a_second_delivery_of_an_audit_writes_nothing_and_returns_the_same_result(app: WorkerApp) -> None:
    outbox_id = insert_row(app, AUDIT_LOG_TRANSACTION, {})
    kwargs = {"transaction_id": "t-dup", "data": {"n": 1}}
    first = app.tasks[AUDIT_LOG_TRANSACTION].apply(kwargs=kwargs, task_id=outbox_id)
    second = app.tasks[AUDIT_LOG_TRANSACTION].apply(kwargs=kwargs, task_id=outbox_id)
    assert first.result == second.result
    assert query(app, "SELECT count(*) AS n FROM audit_log WHERE task_id = :id", id=outbox_id)[0].n == 1


def test_tasks_sent_by_hand_with_any_id_still_run(app: WorkerApp) -> None:
    outcome = app.tasks[AUDIT_LOG_TRANSACTION].apply(
        kwargs={"transaction_id": "t", "data": {}}, task_id="made-up-by-hand"
    )
    assert outcome.result["task_id"] == "made-up-by-hand"


def test_an_email_is_sent_once_per_task_id(database_url: str, redis_url: str) -> None:
    with smtp_sink() as sink:
        settings = worker_settings(database_url, redis_url, smtp_host=sink.host, smtp_port=sink.port)
        for app in _build_app(settings):
            task_id = str(uuid.uuid4())
            kwargs = {"email": "once@example.com", "amount": "5.00", "status": "SUCCESS"}
            results = [app.tasks[SEND_TRANSACTION_EMAIL].apply(kwargs=kwargs, task_id=task_id) for _ in range(3)]
    assert [r.result for r in results] == [results[0].result] * 3
    assert [m["Message-ID"] for m in sink.messages] == [f"<{task_id}@outbox-transfers>"]
    assert sink.messages[0]["To"] == "once@example.com"


def test_an_unreachable_database_is_retried_then_fails_visibly(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=TASK_LOGGER)
    settings = worker_settings("postgresql://postgres@127.0.0.1:9/nowhere", redis_url, celery_task_max_retries=2)
    for app in _build_app(settings):
        task_id = str(uuid.uuid4())
        outcome = app.tasks[AUDIT_LOG_TRANSACTION].apply(kwargs={"transaction_id": "t", "data": {}}, task_id=task_id)
    assert outcome.status == "FAILURE"
    assert isinstance(outcome.result, OSError)
    retries = [r for r in _our_records(caplog, task_id) if "transient failure" in r.getMessage()]
    assert len(retries) == 2


def test_an_unreachable_mail_server_is_retried_then_marks_the_row_failed(
    app: WorkerApp, database_url: str, redis_url: str
) -> None:
    outbox_id = insert_row(app, SEND_TRANSACTION_EMAIL, {})
    with smtp_sink() as sink:
        closed_port = sink.port
    settings = worker_settings(database_url, redis_url, smtp_host="127.0.0.1", smtp_port=closed_port)
    settings = settings.model_copy(update={"celery_task_max_retries": 1, "smtp_timeout": 2.0})
    for failing in _build_app(settings):
        outcome = failing.tasks[SEND_TRANSACTION_EMAIL].apply(
            kwargs={"email": "x@example.com", "amount": "1.00", "status": "SUCCESS"}, task_id=outbox_id
        )
    assert outcome.status == "FAILURE"
    assert isinstance(outcome.result, ConnectionRefusedError)
    row = outbox_row(app, outbox_id)
    assert row.state == "failed"
    assert "ConnectionRefusedError" in str(row.last_error)
    # Each failed attempt gave its lease back, so a retry never waits for its own lease.
    lease = query(app, "SELECT state, lease_until <= now() AS free FROM task_runs WHERE task_id = :id", id=outbox_id)
    assert [(r.state, r.free) for r in lease] == [("running", True)]


def test_a_refused_email_fails_without_retry(app: WorkerApp, database_url: str, redis_url: str) -> None:
    outbox_id = insert_row(app, SEND_TRANSACTION_EMAIL, {})
    with smtp_sink(reply="550 5.1.1 mailbox unavailable") as sink:
        settings = worker_settings(database_url, redis_url, smtp_host=sink.host, smtp_port=sink.port)
        for refusing in _build_app(settings):
            outcome = refusing.tasks[SEND_TRANSACTION_EMAIL].apply(
                kwargs={"email": "gone@example.com", "amount": "1.00", "status": "SUCCESS"}, task_id=outbox_id
            )
    assert outcome.status == "FAILURE"
    assert isinstance(outcome.result, PermanentDeliveryError)
    assert outbox_row(app, outbox_id).state == "failed"


@pytest.mark.timing
@pytest.mark.parametrize(
    ("task_name", "kwargs", "seconds"),
    [
        (SEND_TRANSACTION_EMAIL, {"email": "t@example.com", "amount": "1.00", "status": "SUCCESS"}, 2.0),
        (AUDIT_LOG_TRANSACTION, {"transaction_id": "t", "data": {}}, 1.0),
    ],
)
def test_default_delays(
    database_url: str, redis_url: str, task_name: str, kwargs: dict[str, Any], seconds: float
) -> None:
    defaults = Settings()
    settings = worker_settings(
        database_url,
        redis_url,
        email_send_delay=defaults.email_send_delay,
        audit_write_delay=defaults.audit_write_delay,
    )
    for app in _build_app(settings):
        app.context.database.run(_noop)  # connect first: time the task, not the first connection
        started = time.monotonic()
        outcome = app.tasks[task_name].apply(kwargs=kwargs, task_id=str(uuid.uuid4()))
        elapsed = time.monotonic() - started
    assert outcome.status == "SUCCESS"
    assert elapsed >= seconds


async def _noop(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as connection:
        await connection.execute("SELECT 1")


def test_a_stale_delivery_cannot_release_or_finish_the_lease_of_the_delivery_that_took_over(app: WorkerApp) -> None:
    database, task_id = app.context.database, str(uuid.uuid4())
    stale = database.run(partial(claim_email_lease, task_id=task_id, lease_seconds=0.2))
    assert stale.token is not None
    time.sleep(0.4)  # the stale holder outlives its lease (a long send, a pause)
    current = database.run(partial(claim_email_lease, task_id=task_id, lease_seconds=60))
    assert current.token is not None
    assert current.token != stale.token

    assert database.run(partial(release_email_lease, task_id=task_id, token=stale.token, maybe_sent=False)) is False
    waiting = database.run(partial(claim_email_lease, task_id=task_id, lease_seconds=60))
    assert (waiting.owned, waiting.retry_in > 50) == (False, True), "the stale release ended the new lease"
    assert database.run(partial(record_email_sent, task_id=task_id, token=stale.token, result={"by": "stale"})) is False
    assert database.run(partial(record_email_sent, task_id=task_id, token=current.token, result={"by": "current"}))
    assert database.run(partial(claim_email_lease, task_id=task_id, lease_seconds=60)).result == {"by": "current"}


def test_a_send_stays_in_doubt_until_its_holder_proves_nothing_went_out(app: WorkerApp) -> None:
    database, task_id = app.context.database, str(uuid.uuid4())

    def in_doubt() -> int:
        return int(query(app, "SELECT sends_in_doubt FROM task_runs WHERE task_id = :id", id=task_id)[0][0])

    first = database.run(partial(claim_email_lease, task_id=task_id, lease_seconds=60))
    assert first.token is not None
    assert in_doubt() == 1  # from the moment a lease is taken to send
    database.run(partial(release_email_lease, task_id=task_id, token=first.token, maybe_sent=False))
    assert in_doubt() == 0  # refused before the data: nothing went out
    second = database.run(partial(claim_email_lease, task_id=task_id, lease_seconds=60))
    assert second.token is not None
    database.run(partial(release_email_lease, task_id=task_id, token=second.token, maybe_sent=True))
    assert in_doubt() == 1  # the connection broke after the data: it may have been accepted
    database.run(partial(release_email_lease, task_id=task_id, token=second.token, maybe_sent=False))
    assert in_doubt() == 1  # a second release with the same token changes nothing


def test_a_server_slow_at_every_step_cannot_stretch_a_send_past_its_deadline(database_url: str, redis_url: str) -> None:
    # Each step answers within SMTP_TIMEOUT (3 s), but together they would take 4 s.
    with smtp_sink(step_delay=2.0, slow_sessions=1) as sink:
        settings = worker_settings(database_url, redis_url, smtp_host=sink.host, smtp_port=sink.port, smtp_timeout=3)
        message = build_message(settings, task_id="t", email="a@example.com", amount="1.00", status="SUCCESS")
        started = time.monotonic()
        with pytest.raises(SendDeadlineExceeded):
            send_email(settings, lambda: message, deadline=started + 1.0)
        assert time.monotonic() - started < 2.5  # the deadline, not the sum of the steps
        assert (sink.count, sink.started) == (0, 0)


def test_a_send_that_breaks_after_its_data_is_in_doubt(database_url: str, redis_url: str) -> None:
    with smtp_sink(reply_delay=3.0) as sink:  # holds its answer to the data
        settings = worker_settings(database_url, redis_url, smtp_host=sink.host, smtp_port=sink.port, smtp_timeout=3)
        message = build_message(settings, task_id="t", email="a@example.com", amount="1.00", status="SUCCESS")
        with pytest.raises(DeliveryUncertain):
            send_email(settings, lambda: message, deadline=time.monotonic() + 1.0)
        assert sink.started == 1


def test_a_duplicate_audit_returns_before_the_audit_systems_latency(
    app: WorkerApp, database_url: str, redis_url: str
) -> None:
    outbox_id = insert_row(app, AUDIT_LOG_TRANSACTION, {})
    kwargs = {"transaction_id": "t-before-delay", "data": {"n": 1}}
    first = app.tasks[AUDIT_LOG_TRANSACTION].apply(kwargs=kwargs, task_id=outbox_id)
    row = query(
        app,
        "SELECT deliveries, delivery_started_at IS NOT NULL AS started, "
        "delivery_lease_until > now() + interval '30 seconds' AS leased FROM outbox WHERE id = CAST(:id AS uuid)",
        id=outbox_id,
    )[0]
    assert (row.deliveries, row.started, row.leased) == (1, True, True)  # the lease lasts the time limit (60 s)
    slow = worker_settings(database_url, redis_url, audit_write_delay=5.0)
    for slow_app in _build_app(slow):
        started = time.monotonic()
        second = slow_app.tasks[AUDIT_LOG_TRANSACTION].apply(kwargs=kwargs, task_id=outbox_id)
        elapsed = time.monotonic() - started
    assert second.result == first.result
    assert elapsed < 5.0, "the duplicate waited out the audit system's latency before finding its record"


async def _hold_row(database_url: str, outbox_id: str, held: threading.Event, release: threading.Event) -> None:
    connection = await asyncpg.connect(make_url(database_url).set(drivername="postgresql").render_as_string(False))
    try:
        async with connection.transaction():
            await connection.execute("SELECT 1 FROM outbox WHERE id = $1 FOR UPDATE", uuid.UUID(outbox_id))
            held.set()
            await asyncio.to_thread(release.wait, 60)
    finally:
        await connection.close()


def test_an_email_is_recorded_as_sent_while_a_relay_holds_its_outbox_row(database_url: str, redis_url: str) -> None:
    """A relay frozen mid-batch holds the row's lock: the send's record must not wait for it."""
    held, release = threading.Event(), threading.Event()
    with smtp_sink() as sink:
        settings = worker_settings(database_url, redis_url, smtp_host=sink.host, smtp_port=sink.port)
        for app in _build_app(settings):
            outbox_id = insert_row(app, SEND_TRANSACTION_EMAIL, {})
            holder = threading.Thread(target=asyncio.run, args=(_hold_row(database_url, outbox_id, held, release),))
            holder.start()
            try:
                assert held.wait(10)
                kwargs = {"email": "locked@example.com", "amount": "2.00", "status": "SUCCESS"}
                outcome = app.tasks[SEND_TRANSACTION_EMAIL].apply(kwargs=kwargs, task_id=outbox_id)
                assert outcome.status == "SUCCESS", outcome.traceback
                run = query(app, "SELECT state FROM task_runs WHERE task_id = :id", id=outbox_id)
                assert [r.state for r in run] == ["done"]  # committed while the row was still locked
                assert outbox_row(app, outbox_id).state == "published"  # left to the reconciler
            finally:
                release.set()
                holder.join(10)
            again = app.tasks[SEND_TRANSACTION_EMAIL].apply(kwargs=kwargs, task_id=outbox_id)  # a redelivery
            assert again.result == outcome.result
            assert outbox_row(app, outbox_id).state == "completed"
    assert sink.count == 1


def test_an_audit_is_recorded_while_a_relay_holds_its_outbox_row(app: WorkerApp, database_url: str) -> None:
    """The statement that writes the audit row completes the outbox row too, but never waits
    for the row's lock: the audit commits, and the row is left for a later completion."""
    held, release = threading.Event(), threading.Event()
    transaction_id = str(uuid.uuid4())
    kwargs = {"transaction_id": transaction_id, "data": {"amount": "3.00"}}
    outbox_id = insert_row(app, AUDIT_LOG_TRANSACTION, kwargs)
    holder = threading.Thread(target=asyncio.run, args=(_hold_row(database_url, outbox_id, held, release),))
    holder.start()
    try:
        assert held.wait(10)
        outcome = app.tasks[AUDIT_LOG_TRANSACTION].apply(kwargs=kwargs, task_id=outbox_id)
        assert outcome.status == "SUCCESS", outcome.traceback
        audit = query(app, "SELECT data FROM audit_log WHERE task_id = :id", id=outbox_id)
        assert [r.data for r in audit] == [kwargs["data"]]  # committed while the row was still locked
        assert outbox_row(app, outbox_id).state == "published"
    finally:
        release.set()
        holder.join(10)
    again = app.tasks[AUDIT_LOG_TRANSACTION].apply(kwargs=kwargs, task_id=outbox_id)  # a redelivery
    assert again.result == outcome.result
    assert outbox_row(app, outbox_id).state == "completed"
    assert len(query(app, "SELECT 1 FROM audit_log WHERE task_id = :id", id=outbox_id)) == 1
