"""The two tasks of the contract (core/contract.py): the transfer email and the audit record.

Delivery is at least once (a relay may publish twice, the broker redelivers what a dead
worker held), so each task makes its effect once per task id (see worker.effects).
Transient failures are retried with backoff; anything else fails the task for good, and a
task that fails for good marks its outbox row `failed`.

Each task's work is a coroutine of a Delivery (its request, settings and the process's connection
pool), run on the process's event loop (worker.db): by the asyncio pool before Celery's trace
(worker.pool), or by the task's function while its thread waits under any other pool. The work
never publishes: a retry is asked for with RetryRequested, and the task's function, in Celery's
trace, sends it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, ClassVar, TypeVar

import asyncpg
from celery import Celery, Task

from core.backoff import backoff_delay
from core.contract import AUDIT_LOG_TRANSACTION, SEND_TRANSACTION_EMAIL
from core.outbox.states import RunState
from core.settings import Settings
from worker import prepared
from worker.arguments import AuditArguments, EmailArguments, parse_arguments
from worker.context import WorkerContext
from worker.db import CALL_TIMEOUT, WorkerDatabase
from worker.effects import (
    begin_email,
    complete_outbox,
    extend_delivery,
    finish_email,
    mark_outbox_failed,
    release_email_lease,
    start_delivery,
    stored_result,
    write_audit_once,
)
from worker.errors import DeliveryUncertain, InvalidTaskArguments, PermanentDeliveryError
from worker.mailer import build_message, send_email_async
from worker.observability import absorbed, was_absorbed
from worker.retry import is_permanent_smtp_error, is_transient

logger = logging.getLogger(__name__)
T = TypeVar("T")
_T = TypeVar("_T")

# After the email is sent, recording it is retried in place this many times (seconds between),
# then by a task retry that carries the lease's token (SENT_LEASE), so that the retry records the
# send instead of sending again.
_RECORD_PAUSES = (0.5, 1.0, 2.0)
# Completing the outbox row after the effect's record, retried in place (seconds between). Each try
# waits at most the connection's lock_timeout for the row; after the last, the row is left to the
# next delivery or the reconciler, and the task still succeeds.
_COMPLETE_PAUSES = (0.2, 0.5)
# Message headers the tasks carry across their own retries.
LEASE_WAITS = "outbox_lease_waits"  # retries spent waiting for a duplicate's lease (not failures)
SENT_LEASE = "outbox_sent_lease"  # the lease token of an email that was sent but not yet recorded


class RetryRequested(Exception):
    """Raised by a task's coroutine for Celery's retry, which its function then asks for (a retry
    publishes a message, which only Celery's trace thread does)."""

    def __init__(
        self, countdown: float, max_retries: int, headers: dict[str, Any] | None, exc: BaseException | None
    ) -> None:
        super().__init__(f"retry in {countdown:.1f}s")
        self.countdown, self.max_retries, self.headers, self.exc = countdown, max_retries, headers, exc


class Delivery:
    """One delivery of a task, as its coroutine sees it: the request (id, retries, headers), the
    settings, the process's connection pool, and the retry policy."""

    def __init__(self, task: OutboxTask, request: Any, pool: asyncpg.Pool) -> None:
        self.name: str = task.name
        self.settings = task.settings
        self.max_retries: int = task.max_retries
        self.request = request
        self.task_id: str = request.id
        self.pool = pool

    async def call(self, operation: Callable[..., Awaitable[T]], **arguments: Any) -> T:
        """`operation(pool, **arguments)`, bounded like any database call of the worker (CALL_TIMEOUT)."""
        async with asyncio.timeout(CALL_TIMEOUT):
            return await operation(self.pool, **arguments)

    def header(self, name: str) -> Any:
        return (self.request.headers or {}).get(name)

    def lease_waits(self) -> int:
        """How many of this task's retries were spent waiting for another delivery's lease."""
        waits = self.header(LEASE_WAITS)
        return waits if isinstance(waits, int) and 0 <= waits <= self.request.retries else 0

    def transient_failures(self) -> int:
        """Retries spent on transient failures: Celery's count, less the waits for a lease.

        Celery's retry() always sends request.retries + 1, whatever it waited for, so the waits
        are counted apart (LEASE_WAITS) and do not use up CELERY_TASK_MAX_RETRIES.
        """
        retries: int = self.request.retries
        return retries - self.lease_waits()

    async def _retry(
        self, countdown: float, *, max_retries: int, headers: dict[str, Any], exc: BaseException | None = None
    ) -> RetryRequested:
        await self.keep_alive(countdown)
        merged = {**(self.request.headers or {}), LEASE_WAITS: self.lease_waits(), **headers}
        return RetryRequested(countdown, max_retries, merged, exc)

    async def retry_later(self, error: BaseException, headers: dict[str, Any] | None = None) -> RetryRequested:
        """A retry after an exponential, jittered pause. Once CELERY_TASK_MAX_RETRIES transient failures
        are used up, Celery raises `error` itself instead (then on_failure marks the row failed)."""
        failures, waits = self.transient_failures(), self.lease_waits()
        countdown = backoff_delay(failures + 1, base=1.0, cap=self.settings.celery_retry_backoff_max)
        extra = {"task_id": self.task_id, "task_name": self.name}
        if failures >= self.max_retries:
            logger.warning("%s: retries used up (%d)", self.name, self.max_retries, extra=extra)
            # Celery raises `error` (retries would exceed max_retries) and sends nothing.
            return RetryRequested(countdown, waits + self.max_retries, None, error)
        logger.warning(
            "%s: transient failure, retry %d/%s in %.1fs: %s: %s",
            self.name,
            failures + 1,
            self.max_retries,
            countdown,
            type(error).__name__,
            error,
            extra=extra,
        )
        return await self._retry(countdown, max_retries=waits + self.max_retries, headers=headers or {}, exc=error)

    async def wait_for_lease(self, lease_left: float) -> RetryRequested:
        """Come back when another delivery's lease runs out; not counted as a failure."""
        countdown = min(lease_left + backoff_delay(1, base=1.0, cap=1.0), self.settings.celery_retry_backoff_max)
        waits = self.lease_waits() + 1
        logger.info(
            "%s: another delivery holds the lease; waiting %.1fs (wait %d)",
            self.name,
            countdown,
            waits,
            extra={"task_id": self.task_id, "task_name": self.name},
        )
        return await self._retry(countdown, max_retries=self.request.retries + 1, headers={LEASE_WAITS: waits})

    async def keep_alive(self, countdown: float) -> None:
        """Keep this delivery counted as alive on its outbox row across a retry's countdown, so the
        reconciler does not take it for a dead one. Best effort: a delivery taken for dead is only
        re-published, and its duplicate recognised."""
        seconds = countdown + self.settings.celery_task_time_limit
        try:
            await self.call(extend_delivery, task_id=self.task_id, seconds=seconds)
        except Exception:
            logger.info("could not extend the delivery's lease", exc_info=True, extra={"task_id": self.task_id})

    async def complete(self) -> None:
        """Complete the outbox row after the effect's record committed; never holds up the result."""
        for pause in (*_COMPLETE_PAUSES, None):
            try:
                await self.call(complete_outbox, task_id=self.task_id)
                return
            except Exception as error:
                if pause is None:
                    logger.warning(
                        "effect recorded, outbox row not completed (%s: %s); the next delivery or the "
                        "reconciler completes it",
                        type(error).__name__,
                        error,
                        extra={"task_id": self.task_id, "task_name": self.name},
                    )
                    return
                await asyncio.sleep(pause)

    def absorbed(self, result: _T) -> _T:
        """`result`, the stored result of an effect that already existed (see observability.absorbed)."""
        return absorbed(self.request, result)


Work = Callable[[Delivery, tuple[Any, ...], dict[str, Any]], Awaitable[dict[str, Any]]]


class OutboxTask(Task):  # type: ignore[misc]
    """Base of the tasks: their context (settings, database), their work and failure marking.

    register_tasks() derives one subclass per app, bound to that app's context, and one per task,
    holding its work (`work`, a coroutine function of a Delivery).
    """

    # Expected failures: the result backend shows FAILURE, the log shows no traceback.
    throws = (InvalidTaskArguments, PermanentDeliveryError)
    context: ClassVar[WorkerContext]
    work: ClassVar[Work]

    @classmethod
    def bound_to(cls, context: WorkerContext) -> type[OutboxTask]:
        return type("OutboxTask", (cls,), {"context": context})

    @property
    def settings(self) -> Settings:
        return self.context.settings

    @property
    def database(self) -> WorkerDatabase:
        return self.context.database

    def coroutine(
        self, request: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Callable[[asyncpg.Pool], Awaitable[dict[str, Any]]]:
        """The delivery's work, for WorkerDatabase to run on the loop with the process's pool."""

        async def perform(pool: asyncpg.Pool) -> dict[str, Any]:
            return await type(self).work(Delivery(self, request, pool), args, kwargs)

        return perform

    def execute(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The task's function: the result of its work, run on the loop (by the asyncio pool before
        this trace, or now while this thread waits), or the retry its work asked for."""
        handed = prepared.current(self.request.id)
        try:
            if handed is None:
                return self.database.run(self.coroutine(self.request, args, kwargs), timeout=None)
            assert handed.outcome is not None
            if was_absorbed(handed.request):
                absorbed(self.request, None)
            result: dict[str, Any] = handed.outcome.result()
            return result
        except RetryRequested as retry:
            raise self.retry(
                exc=retry.exc, countdown=retry.countdown, max_retries=retry.max_retries, headers=retry.headers
            ) from None

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """Mark the outbox row failed. Best effort: if the database is down too, the relay's
        reconciler finds the delivery's lease run out and publishes the row again."""
        error = f"{type(exc).__name__}: {exc}"
        extra = {"task_id": task_id, "task_name": self.name}
        try:
            marked = self.database.run(partial(mark_outbox_failed, task_id=task_id, error=error))
        except Exception:
            logger.warning("%s failed and its outbox row could not be marked", self.name, exc_info=True, extra=extra)
            return
        logger.error("%s failed for good (outbox row marked: %s): %s", self.name, marked, error, extra=extra)


async def _started(delivery: Delivery) -> dict[str, Any] | None:
    """Record the delivery's start; the stored result if the task id's effect is already done."""
    lease = delivery.settings.celery_task_time_limit
    stored = await delivery.call(start_delivery, task_id=delivery.task_id, lease_seconds=lease)
    return delivery.absorbed(stored.result) if stored is not None and stored.state == RunState.DONE else None


async def send_transaction_email(delivery: Delivery, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Send the transfer notification once per task id; return the contract's result."""
    arguments = parse_arguments(EmailArguments, args, kwargs)
    task_id, settings = delivery.task_id, delivery.settings
    extra = {"task_id": task_id, "task_name": SEND_TRANSACTION_EMAIL}
    # At DEBUG only: the run's INFO line (worker.observability) names the task id, which finds the
    # outbox row, and a line per task costs a few percent of the worker's CPU. The recipient is
    # personal data.
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "send_transaction_email to %s amount=%s status=%s",
            arguments.email,
            arguments.amount,
            arguments.status,
            extra=extra,
        )
    result = {"success": True, "message": f"Transfer notification sent to {arguments.email}", "task_id": task_id}
    sent_token = delivery.header(SENT_LEASE)
    if isinstance(sent_token, str):  # an earlier run of this task sent it: record, never send again
        return await _record_sent(delivery, uuid.UUID(sent_token), result)
    try:
        started = time.monotonic()  # no later than the database's start of the lease
        lease = settings.celery_task_time_limit
        done, claim = await delivery.call(begin_email, task_id=task_id, lease_seconds=lease)
    except Exception as error:
        if not is_transient(error):
            raise
        raise await delivery.retry_later(error) from None
    if claim is None:  # a duplicate of a sent email
        assert done is not None
        await delivery.complete()
        return delivery.absorbed(done)
    if claim.result is not None:
        await delivery.complete()
        return delivery.absorbed(claim.result)
    if claim.token is None:
        # A duplicate delivery is sending right now. Come back when its lease runs out: by then
        # it has recorded the email (we return its result) or died (we take over).
        raise await delivery.wait_for_lease(claim.retry_in)
    compose = partial(
        build_message,
        settings,
        task_id=task_id,
        email=arguments.email,
        amount=arguments.amount,
        status=arguments.status,
    )
    try:
        # The whole send ends by the soft limit, before the lease (the hard limit) runs out, which
        # leaves the rest of the lease to record it.
        await send_email_async(settings, compose, deadline=started + settings.celery_task_soft_time_limit)
    except Exception as error:
        await _release_lease(delivery, claim.token, maybe_sent=isinstance(error, DeliveryUncertain))
        if is_permanent_smtp_error(error):
            raise PermanentDeliveryError(f"the mail server refused the message: {error}") from error
        if not is_transient(error):
            raise
        raise await delivery.retry_later(error) from None
    return await _record_sent(delivery, claim.token, result)


async def _release_lease(delivery: Delivery, token: uuid.UUID, *, maybe_sent: bool) -> None:
    task_id = delivery.task_id
    try:
        released = await delivery.call(release_email_lease, task_id=task_id, token=token, maybe_sent=maybe_sent)
    except Exception:  # the lease then simply runs out
        logger.warning("could not release the email lease", exc_info=True, extra={"task_id": task_id})
        return
    if not released:
        logger.warning("the email lease had been taken over; left to its holder", extra={"task_id": task_id})


async def _record_sent(delivery: Delivery, token: uuid.UUID, result: dict[str, Any]) -> dict[str, Any]:
    """Record the sent email under the lease `token`, then complete the outbox row."""
    task_id = delivery.task_id
    for pause in (*_RECORD_PAUSES, None):
        try:
            recorded, completed = await delivery.call(finish_email, task_id=task_id, token=token, result=result)
            break
        except Exception as error:
            if not is_transient(error):
                raise
            if pause is None:
                # Sent, not recorded: the retry records it with this token instead of sending again.
                raise await delivery.retry_later(error, {SENT_LEASE: str(token)}) from None
            await asyncio.sleep(pause)
    if not recorded:
        return await _lost_lease(delivery, result)
    if not completed:
        await delivery.complete()
    return result


async def _lost_lease(delivery: Delivery, result: dict[str, Any]) -> dict[str, Any]:
    """The send happened, but this delivery's lease was no longer its own when it came to record it."""
    task_id = delivery.task_id
    try:
        stored = await delivery.call(stored_result, task_id=task_id)
    except Exception:  # the email went out: this task succeeded whatever the record says
        logger.warning("could not read the email's record", exc_info=True, extra={"task_id": task_id})
        stored = None
    if stored is None:
        # Our lease ran out while we sent and another delivery took it over: it sends too.
        logger.warning(
            "the email was sent after its lease was taken over: it may go out twice",
            extra={"task_id": task_id, "task_name": SEND_TRANSACTION_EMAIL},
        )
    await delivery.complete()
    return stored or result


async def audit_log_transaction(delivery: Delivery, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Write the audit row once per task id; return the contract's result."""
    arguments = parse_arguments(AuditArguments, args, kwargs)
    task_id = delivery.task_id
    extra = {"task_id": task_id, "task_name": AUDIT_LOG_TRANSACTION, "transaction_id": arguments.transaction_id}
    if logger.isEnabledFor(logging.DEBUG):  # only when asked for, as the email's line
        data = json.dumps(arguments.data, sort_keys=True, default=str)
        logger.debug("audit_log_transaction transaction_id=%s data %s", arguments.transaction_id, data, extra=extra)
    result = {
        "success": True,
        "message": f"Audit log written for transaction {arguments.transaction_id}",
        "task_id": task_id,
        "transaction_id": arguments.transaction_id,
    }
    try:
        duplicate = await _started(delivery)  # a duplicate returns here, before the audit system's latency
        if duplicate is not None:
            done, completed = duplicate, False
        else:
            if delivery.settings.audit_write_delay:  # the audit system's latency
                await asyncio.sleep(delivery.settings.audit_write_delay)
            done, completed = await delivery.call(
                write_audit_once,
                task_id=task_id,
                transaction_id=arguments.transaction_id,
                data=arguments.data,
                result=result,
            )
    except Exception as error:
        if not is_transient(error):
            raise
        raise await delivery.retry_later(error) from None
    if not completed:
        await delivery.complete()
    return done


def register_tasks(app: Celery, context: WorkerContext) -> None:
    """Register both tasks on `app` under the contract's names, bound to `context`."""
    base = OutboxTask.bound_to(context)
    options: dict[str, Any] = {
        "bind": True,
        "max_retries": context.settings.celery_task_max_retries,
        # Not shared: each app (tests build several) keeps its own tasks and their settings.
        "shared": False,
    }

    def with_work(work: Work) -> type[OutboxTask]:
        return type("OutboxTask", (base,), {"work": staticmethod(work)})

    @app.task(name=SEND_TRANSACTION_EMAIL, base=with_work(send_transaction_email), **options)  # type: ignore[untyped-decorator]
    def _send_transaction_email(self: OutboxTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.execute(args, kwargs)

    @app.task(name=AUDIT_LOG_TRANSACTION, base=with_work(audit_log_transaction), **options)  # type: ignore[untyped-decorator]
    def _audit_log_transaction(self: OutboxTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.execute(args, kwargs)
