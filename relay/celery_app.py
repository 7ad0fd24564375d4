"""The Celery app the relay builds and sends messages with: made from the settings, never from worker/."""

from __future__ import annotations

from celery import Celery

from core.settings import Settings


def create_celery_app(settings: Settings) -> Celery:
    """A producer-only Celery app for the configured broker and queue.

    It has no result backend: the relay never waits for results, and a Redis backend would
    subscribe to every published task id's result channel in the relay's process.
    """
    app = Celery("relay", broker=settings.celery_broker_url, set_as_current=False)
    timeout = settings.relay_publish_timeout
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=settings.celery_task_queue,
        # The relay retries by itself, with backoff, counting each attempt on the row.
        task_publish_retry=False,
        broker_connection_timeout=timeout,
        broker_connection_retry=False,
        broker_transport_options={
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "visibility_timeout": settings.celery_visibility_timeout,
            # Fail a publish at once when the broker is away; the row is retried with backoff.
            "max_retries": 0,
        },
    )
    return app
