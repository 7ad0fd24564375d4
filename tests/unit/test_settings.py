"""Settings follow the environment; explicit URLs win; nonsense stops start-up naming the variable."""

from __future__ import annotations

import os
from unittest import mock
from urllib.parse import unquote, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from core.settings import Settings

hosts = st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,10}){0,2}", fullmatch=True)
ports = st.integers(1, 65535)
names = st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=20)
secrets = st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), min_size=1, max_size=20)


def _settings(env: dict[str, str]) -> Settings:
    with mock.patch.dict(os.environ, env, clear=True):
        return Settings(_env_file=None)


@given(host=hosts, port=ports, user=names, password=secrets, db=names)
def test_database_url_is_built_from_parts(host: str, port: int, user: str, password: str, db: str) -> None:
    settings = _settings(
        {
            "POSTGRES_HOST": host,
            "POSTGRES_PORT": str(port),
            "POSTGRES_USER": user,
            "POSTGRES_PASSWORD": password,
            "POSTGRES_DB": db,
        }
    )
    url = urlsplit(settings.async_database_url)
    assert url.scheme == "postgresql+asyncpg"
    assert (url.hostname, url.port, url.path) == (host, port, f"/{db}")
    assert unquote(url.username or "") == user
    assert unquote(url.password or "") == password


@given(host=hosts, port=ports, db=st.integers(0, 15), password=st.none() | secrets)
def test_celery_urls_are_built_from_redis_parts(host: str, port: int, db: int, password: str | None) -> None:
    env = {"REDIS_HOST": host, "REDIS_PORT": str(port), "REDIS_DB": str(db)}
    if password is not None:
        env["REDIS_PASSWORD"] = password
    settings = _settings(env)
    for url in (settings.celery_broker_url, settings.celery_result_backend):
        parts = urlsplit(url)
        assert (parts.scheme, parts.hostname, parts.port, parts.path) == ("redis", host, port, f"/{db}")
        if password is None:
            assert parts.password is None
        else:
            assert unquote(parts.password or "") == password


@given(host=hosts, port=ports, db=names)
def test_explicit_urls_win_over_parts(host: str, port: int, db: str) -> None:
    settings = _settings(
        {
            "DATABASE_URL": f"postgresql://u@{host}:{port}/{db}",
            "POSTGRES_HOST": "ignored",
            "CELERY_BROKER_URL": f"amqp://guest:guest@{host}:{port}//",
            "CELERY_RESULT_BACKEND": f"redis://{host}:{port}/3",
            "REDIS_HOST": "ignored",
        }
    )
    assert settings.async_database_url == f"postgresql+asyncpg://u@{host}:{port}/{db}"
    assert settings.celery_broker_url == f"amqp://guest:guest@{host}:{port}//"
    assert settings.celery_result_backend == f"redis://{host}:{port}/3"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"POSTGRES_PORT": "five"}, "postgres_port"),
        ({"REDIS_PORT": "70000"}, "redis_port"),
        ({"DATABASE_URL": "mysql://root@localhost/db"}, "DATABASE_URL"),
        ({"CELERY_BROKER_URL": "kafka://localhost"}, "CELERY_BROKER_URL"),
        ({"RELAY_BATCH_SIZE": "0"}, "relay_batch_size"),
        ({"WORKER_METRICS_PORT": "70000"}, "worker_metrics_port"),
        ({"WORKER_BATCH_WINDOW": "-0.01"}, "worker_batch_window"),
        ({"WORKER_BATCH_WINDOW": "5"}, "worker_batch_window"),  # seconds: a typo for milliseconds
        ({"API_PORT": "9000", "API_METRICS_PORT": "9000"}, "API_METRICS_PORT"),
    ],
)
def test_nonsense_is_refused_naming_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ValidationError) as error:
        _settings(env)
    assert variable.lower() in str(error.value).lower()


SECRET = "s3cr3t-Pa55word-that-must-not-leak"


def test_secrets_never_show_in_the_repr() -> None:
    settings = _settings(
        {
            "POSTGRES_PASSWORD": SECRET,
            "REDIS_PASSWORD": SECRET,
            "SMTP_PASSWORD": SECRET,
            "ADMIN_API_KEY": SECRET + "-long-enough-for-a-key",
            "DATABASE_URL": f"postgresql://u:{SECRET}@db/app",
            "CELERY_BROKER_URL": f"redis://:{SECRET}@redis:6379/0",
            "CELERY_RESULT_BACKEND": f"redis://:{SECRET}@redis:6379/1",
            "RATE_LIMIT_STORAGE_URL": f"redis://:{SECRET}@redis:6379/2",
        }
    )
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)
    assert SECRET not in str(settings.model_dump())
    # ...while the processes still get what they need to connect.
    assert SECRET in settings.async_database_url
    assert SECRET in settings.celery_broker_url
    assert SECRET in settings.rate_limit_storage
    assert settings.admin_key == SECRET + "-long-enough-for-a-key"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"DATABASE_URL": f"mysql://root:{SECRET}@localhost/db"}, "DATABASE_URL"),
        ({"CELERY_BROKER_URL": f"kafka://u:{SECRET}@localhost"}, "CELERY_BROKER_URL"),
        ({"RATE_LIMIT_STORAGE_URL": f"memcached://u:{SECRET}@localhost"}, "RATE_LIMIT_STORAGE_URL"),
        ({"ADMIN_API_KEY": SECRET[:10]}, "ADMIN_API_KEY"),
        ({"POSTGRES_PORT": SECRET}, "postgres_port"),
    ],
)
def test_a_validation_error_names_the_variable_but_never_echoes_its_value(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ValidationError) as error:
        _settings(env)
    assert variable.lower() in str(error.value).lower()
    assert SECRET not in str(error.value)
    assert SECRET[:10] not in str(error.value)


@pytest.mark.parametrize("value", ["0", "-5", "1e3", "10.001", "1_000", "ten", "١٢", "99999999999999999"])
def test_max_transfer_amount_is_validated_at_start_up(value: str) -> None:
    with pytest.raises(ValidationError) as error:
        _settings({"MAX_TRANSFER_AMOUNT": value})
    assert "MAX_TRANSFER_AMOUNT" in str(error.value)


def test_max_transfer_amount_accepts_an_exact_amount() -> None:
    assert str(_settings({"MAX_TRANSFER_AMOUNT": "500.5"}).max_transfer_amount) == "500.5"


@pytest.mark.parametrize("value", ["fast", "100/fortnight", "-1/second", ""])
def test_rate_limit_must_be_in_limits_notation(value: str) -> None:
    with pytest.raises(ValidationError) as error:
        _settings({"RATE_LIMIT": value})
    assert "RATE_LIMIT" in str(error.value)


def test_the_rate_limit_is_shared_through_the_brokers_redis_by_default() -> None:
    assert _settings({"CELERY_BROKER_URL": "redis://b:6379/4"}).rate_limit_storage == "redis://b:6379/4"
    assert _settings({"CELERY_BROKER_URL": "amqp://b//"}).rate_limit_storage == "redis://localhost:6379/0"
    assert _settings({"RATE_LIMIT_STORAGE_URL": "memory://"}).rate_limit_storage == "memory://"


def test_the_idle_transaction_timeout_defaults_to_three_publish_timeouts_and_must_exceed_one() -> None:
    assert _settings({}).relay_idle_transaction_timeout == 15.0
    assert _settings({"RELAY_PUBLISH_TIMEOUT": "2"}).relay_idle_transaction_timeout_s == 6.0
    assert _settings({"RELAY_IDLE_TRANSACTION_TIMEOUT": "30"}).relay_idle_transaction_timeout_s == 30.0
    with pytest.raises(ValidationError, match=r"RELAY_IDLE_TRANSACTION_TIMEOUT .* must be longer than RELAY_PUBLISH"):
        _settings({"RELAY_IDLE_TRANSACTION_TIMEOUT": "5", "RELAY_PUBLISH_TIMEOUT": "5"})
