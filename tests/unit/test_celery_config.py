"""The worker's Celery configuration follows the settings, and refuses limits that break redelivery."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.contract import AUDIT_LOG_TRANSACTION, SEND_TRANSACTION_EMAIL
from core.settings import Settings
from worker.celery_app import create_celery_app
from worker.db import pool_options


def _settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


def test_serialization_is_json_only_and_time_is_utc() -> None:
    conf = create_celery_app(_settings()).conf
    assert conf.task_serializer == "json"
    assert conf.result_serializer == "json"
    assert conf.accept_content == ["json"]
    assert conf.result_accept_content == ["json"]
    assert conf.timezone == "UTC"
    assert conf.enable_utc is True


def test_reliability_knobs() -> None:
    conf = create_celery_app(_settings()).conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_track_started is False  # the outbox row records each delivery's start
    assert conf.worker_send_task_events is False  # only Flower needs them: CELERY_TASK_EVENTS=true
    assert conf.broker_connection_retry_on_startup is True
    assert conf.result_backend_always_retry is True
    assert 0 < conf.result_backend_max_retries < float("inf")
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_time_limit


def test_defaults_suit_io_bound_tasks() -> None:
    settings = _settings()
    conf = create_celery_app(settings).conf
    assert conf.worker_pool == "worker.pool:AsyncioPool"  # task waits on the loop, not a thread each
    assert conf.worker_concurrency == 1024
    assert conf.task_time_limit == 60
    assert conf.task_soft_time_limit == 50
    assert conf.task_default_queue == "celery"
    # A few connections serve every slot: a task holds one only for a statement.
    assert pool_options(settings).max_size == settings.worker_db_pool_size


def test_tasks_are_registered_under_the_contract_names() -> None:
    app = create_celery_app(_settings())
    assert {SEND_TRANSACTION_EMAIL, AUDIT_LOG_TRANSACTION} <= set(app.tasks)


def test_urls_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://broker.example:6380/3")
    monkeypatch.setenv("CELERY_RESULT_BACKEND", "redis://results.example:6381/4")
    monkeypatch.setenv("CELERY_TASK_TIME_LIMIT", "30")
    monkeypatch.setenv("CELERY_TASK_SOFT_TIME_LIMIT", "20")
    monkeypatch.setenv("CELERY_VISIBILITY_TIMEOUT", "120")
    conf = create_celery_app(_settings()).conf
    assert conf.broker_url == "redis://broker.example:6380/3"
    assert conf.result_backend == "redis://results.example:6381/4"
    assert (conf.task_time_limit, conf.task_soft_time_limit) == (30, 20)
    assert conf.broker_transport_options["visibility_timeout"] == 120


def test_urls_are_built_from_redis_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    monkeypatch.delenv("CELERY_RESULT_BACKEND", raising=False)
    monkeypatch.setenv("REDIS_HOST", "cache.internal")
    monkeypatch.setenv("REDIS_PORT", "6390")
    conf = create_celery_app(_settings()).conf
    assert conf.broker_url == "redis://cache.internal:6390/0"
    assert conf.result_backend == "redis://cache.internal:6390/0"


@pytest.mark.parametrize(
    ("values", "variable"),
    [
        ({"celery_task_time_limit": 60, "celery_visibility_timeout": 60}, "CELERY_VISIBILITY_TIMEOUT"),
        ({"celery_task_time_limit": 30, "celery_task_soft_time_limit": 30}, "CELERY_TASK_SOFT_TIME_LIMIT"),
        ({"celery_task_time_limit": 60, "celery_retry_backoff_max": 60, "celery_visibility_timeout": 120}, "BACKOFF"),
        ({"celery_task_time_limit": 10, "celery_task_soft_time_limit": 5, "smtp_timeout": 10}, "SMTP_TIMEOUT"),
    ],
)
def test_limits_that_break_redelivery_are_refused(values: dict[str, int], variable: str) -> None:
    with pytest.raises(ValueError, match=variable):
        create_celery_app(_settings(**values))


@st.composite
def valid_environments(draw: st.DrawFn) -> dict[str, str]:
    hard = draw(st.integers(min_value=2, max_value=3_600))
    soft = draw(st.integers(min_value=1, max_value=hard - 1))
    backoff = draw(st.integers(min_value=1, max_value=600))
    visibility = draw(st.integers(min_value=hard + backoff + 1, max_value=86_400))
    host = draw(st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True))
    return {
        "CELERY_BROKER_URL": f"redis://{host}:{draw(st.integers(1, 65535))}/{draw(st.integers(0, 15))}",
        "CELERY_RESULT_BACKEND": f"redis://{host}-results:6379/{draw(st.integers(0, 15))}",
        "CELERY_TASK_TIME_LIMIT": str(hard),
        "CELERY_TASK_SOFT_TIME_LIMIT": str(soft),
        "CELERY_VISIBILITY_TIMEOUT": str(visibility),
        "CELERY_RETRY_BACKOFF_MAX": str(backoff),
        "CELERY_RESULT_EXPIRES": str(draw(st.integers(1, 10**7))),
        "CELERY_WORKER_POOL": draw(st.sampled_from(["threads", "prefork", "solo"])),
        "CELERY_WORKER_CONCURRENCY": str(draw(st.integers(1, 512))),
        "CELERY_TASK_QUEUE": draw(st.from_regex(r"[a-z][a-z0-9._-]{0,30}", fullmatch=True)),
        "CELERY_TASK_MAX_RETRIES": str(draw(st.integers(0, 50))),
        "SMTP_TIMEOUT": str(draw(st.floats(min_value=0.1, max_value=hard - 0.5))),
    }


@given(env=valid_environments())
def test_configuration_follows_any_valid_environment(env: dict[str, str]) -> None:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        app = create_celery_app(_settings())
    conf = app.conf
    assert conf.broker_url == env["CELERY_BROKER_URL"]
    assert conf.result_backend == env["CELERY_RESULT_BACKEND"]
    assert conf.task_time_limit == int(env["CELERY_TASK_TIME_LIMIT"])
    assert conf.task_soft_time_limit == int(env["CELERY_TASK_SOFT_TIME_LIMIT"])
    assert conf.result_expires == int(env["CELERY_RESULT_EXPIRES"])
    assert conf.worker_pool == env["CELERY_WORKER_POOL"]
    assert conf.worker_concurrency == int(env["CELERY_WORKER_CONCURRENCY"])
    assert conf.task_default_queue == env["CELERY_TASK_QUEUE"]
    assert app.tasks[SEND_TRANSACTION_EMAIL].max_retries == int(env["CELERY_TASK_MAX_RETRIES"])
    transport = conf.broker_transport_options
    assert transport["visibility_timeout"] == int(env["CELERY_VISIBILITY_TIMEOUT"])
    assert transport["visibility_timeout"] > conf.task_time_limit > conf.task_soft_time_limit
    # Abandoned messages are looked for well within one visibility timeout.
    assert 1 <= transport["unacked_restore_interval"] <= max(1, transport["visibility_timeout"] // 5)
    assert (conf.task_serializer, conf.accept_content, conf.task_acks_late) == ("json", ["json"], True)


def test_task_events_are_on_only_when_asked_for() -> None:
    assert create_celery_app(_settings(celery_task_events=True)).conf.worker_send_task_events is True
