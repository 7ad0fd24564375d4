"""The two tasks of the contract (core/contract.py): the transfer email and the audit record.

Delivery is at least once (a relay may publish twice, the broker redelivers what a dead
worker held), so each task makes its effect once per task id (see worker.effects).
Transient failures are retried with backoff; anything else fails the task for good, and a
task that fails for good marks its outbox row `failed`.
"""

from __future__ import annotations

import json
import logging
import time
from functools import partial
from typing import Any, ClassVar

from celery import Celery, Task
from celery.exceptions import Retry

from core.backoff import backoff_delay
from core.contract import AUDIT_LOG_TRANSACTION, SEND_TRANSACTION_EMAIL
from core.settings import Settings
from worker.arguments import AuditArguments, EmailArguments, parse_arguments
from worker.context import WorkerContext
from worker.db import WorkerDatabase
from worker.effects import claim_email_lease, finish_email, mark_outbox_failed, release_email_lease, write_audit_once
from worker.errors import InvalidTaskArguments, PermanentDeliveryError
from worker.mailer import build_message, send_email
from worker.retry import is_permanent_smtp_error, is_transient

logger = logging.getLogger(__name__)

# After the email is sent, recording it is retried in place this many times (seconds between):
# a task retry would find its own lease and, once it ran out, send the email again.
_RECORD_PAUSES = (0.5, 1.0, 2.0)


class OutboxTask(Task):  # type: ignore[misc]
    """Base of the tasks: their context (settings, database), retry policy and failure marking.

    register_tasks() derives one subclass per app, bound to that app's context.
    """

    # Expected failures: the result backend shows FAILURE, the log shows no traceback.
    throws = (InvalidTaskArguments, PermanentDeliveryError)
    context: ClassVar[WorkerContext]

    @classmethod
    def bound_to(cls, context: WorkerContext) -> type[OutboxTask]:
        return type("OutboxTask", (cls,), {"context": context})

    @property
    def settings(self) -> Settings:
        return self.context.settings

    @property
    def database(self) -> WorkerDatabase:
        return self.context.database

    def retry_later(self, error: BaseException) -> Retry:
        """Schedule a retry after an exponential, jittered pause. Raises `error` itself once
        CELERY_TASK_MAX_RETRIES retries are used up (then on_failure marks the row failed)."""
        countdown = backoff_delay(self.request.retries + 1, base=1.0, cap=self.settings.celery_retry_backoff_max)
        extra = {"task_id": self.request.id, "task_name": self.name}
        if self.max_retries is not None and self.request.retries >= self.max_retries:
            logger.warning("%s: retries used up (%d)", self.name, self.max_retries, extra=extra)
        else:
            logger.warning(
                "%s: transient failure, retry %d/%s in %.1fs: %s: %s",
                self.name,
                self.request.retries + 1,
                self.max_retries,
                countdown,
                type(error).__name__,
                error,
                extra=extra,
            )
        return self.retry(exc=error, countdown=countdown)

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """Mark the outbox row failed. Best effort: if the database is down too, the relay's
        reconciler finds the row unfinished after the deadline and publishes it again."""
        error = f"{type(exc).__name__}: {exc}"
        extra = {"task_id": task_id, "task_name": self.name}
        try:
            marked = self.database.run(partial(mark_outbox_failed, task_id=task_id, error=error))
        except Exception:
            logger.warning("%s failed and its outbox row could not be marked", self.name, exc_info=True, extra=extra)
            return
        logger.error("%s failed for good (outbox row marked: %s): %s", self.name, marked, error, extra=extra)


def send_transaction_email(task: OutboxTask, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Send the transfer notification once per task id; return the contract's result."""
    arguments = parse_arguments(EmailArguments, args, kwargs)
    task_id: str = task.request.id
    settings = task.settings
    extra = {"task_id": task_id, "task_name": SEND_TRANSACTION_EMAIL}
    # The recipient is personal data: INFO logs carry the task id (which finds the outbox row), not the address.
    logger.info("send_transaction_email amount=%s status=%s", arguments.amount, arguments.status, extra=extra)
    logger.debug("send_transaction_email to %s", arguments.email, extra=extra)
    try:
        claim = task.database.run(
            partial(claim_email_lease, task_id=task_id, lease_seconds=settings.celery_task_time_limit)
        )
    except Exception as error:
        if not is_transient(error):
            raise
        raise task.retry_later(error) from None
    if claim.result is not None:
        return claim.result
    if not claim.owned:
        # A duplicate delivery is sending right now. Come back when its lease runs out: by then
        # it has recorded the email (we return its result) or died (we take over). Not counted
        # against the transient-failure budget.
        countdown = min(claim.retry_in + backoff_delay(1, base=1.0, cap=1.0), settings.celery_retry_backoff_max)
        raise task.retry(countdown=countdown, max_retries=task.request.retries + 1)
    message = build_message(
        settings, task_id=task_id, email=arguments.email, amount=arguments.amount, status=arguments.status
    )
    try:
        send_email(settings, message)
    except Exception as error:
        _release_lease(task, task_id)
        if is_permanent_smtp_error(error):
            raise PermanentDeliveryError(f"the mail server refused the message: {error}") from error
        if not is_transient(error):
            raise
        raise task.retry_later(error) from None
    result = {"success": True, "message": f"Transfer notification sent to {arguments.email}", "task_id": task_id}
    _record_sent(task, task_id, result)
    return result


def _release_lease(task: OutboxTask, task_id: str) -> None:
    try:
        task.database.run(partial(release_email_lease, task_id=task_id))
    except Exception:  # the lease then simply runs out
        logger.warning("could not release the email lease", exc_info=True, extra={"task_id": task_id})


def _record_sent(task: OutboxTask, task_id: str, result: dict[str, Any]) -> None:
    for pause in (*_RECORD_PAUSES, None):
        try:
            task.database.run(partial(finish_email, task_id=task_id, result=result))
            return
        except Exception as error:
            if not is_transient(error):
                raise
            if pause is None:
                # The one window where an email can go out twice: sent, but not recorded.
                raise task.retry_later(error) from None
            time.sleep(pause)


def audit_log_transaction(task: OutboxTask, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Write the audit row once per task id; return the contract's result."""
    arguments = parse_arguments(AuditArguments, args, kwargs)
    task_id: str = task.request.id
    logger.info(
        "audit_log_transaction transaction_id=%s data=%s",
        arguments.transaction_id,
        json.dumps(arguments.data, sort_keys=True, ensure_ascii=False, default=str),
        extra={"task_id": task_id, "task_name": AUDIT_LOG_TRANSACTION, "transaction_id": arguments.transaction_id},
    )
    result = {
        "success": True,
        "message": f"Audit log written for transaction {arguments.transaction_id}",
        "task_id": task_id,
        "transaction_id": arguments.transaction_id,
    }
    try:
        time.sleep(task.settings.audit_write_delay)  # the audit system's latency
        return task.database.run(
            partial(
                write_audit_once,
                task_id=task_id,
                transaction_id=arguments.transaction_id,
                data=arguments.data,
                result=result,
            )
        )
    except Exception as error:
        if not is_transient(error):
            raise
        raise task.retry_later(error) from None


def register_tasks(app: Celery, context: WorkerContext) -> None:
    """Register both tasks on `app` under the contract's names, bound to `context`."""
    options: dict[str, Any] = {
        "bind": True,
        "base": OutboxTask.bound_to(context),
        "max_retries": context.settings.celery_task_max_retries,
        # Not shared: each app (tests build several) keeps its own tasks and their settings.
        "shared": False,
    }

    @app.task(name=SEND_TRANSACTION_EMAIL, **options)  # type: ignore[untyped-decorator]
    def _send_transaction_email(self: OutboxTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return send_transaction_email(self, args, kwargs)

    @app.task(name=AUDIT_LOG_TRANSACTION, **options)  # type: ignore[untyped-decorator]
    def _audit_log_transaction(self: OutboxTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return audit_log_transaction(self, args, kwargs)
