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
    ],
)
def test_nonsense_is_refused_naming_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ValidationError) as error:
        _settings(env)
    assert variable.lower() in str(error.value).lower()


def test_the_idle_transaction_timeout_defaults_to_three_publish_timeouts_and_must_exceed_one() -> None:
    assert _settings({}).relay_idle_transaction_timeout == 15.0
    assert _settings({"RELAY_PUBLISH_TIMEOUT": "2"}).relay_idle_transaction_timeout_s == 6.0
    assert _settings({"RELAY_IDLE_TRANSACTION_TIMEOUT": "30"}).relay_idle_transaction_timeout_s == 30.0
    with pytest.raises(ValidationError, match=r"RELAY_IDLE_TRANSACTION_TIMEOUT .* must be longer than RELAY_PUBLISH"):
        _settings({"RELAY_IDLE_TRANSACTION_TIMEOUT": "5", "RELAY_PUBLISH_TIMEOUT": "5"})
