"""The relay's pure logic: backoff with jitter, operator durations, Celery's kwargsrepr, redis keys."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
import redis.exceptions
from celery.utils.saferepr import saferepr
from hypothesis import given
from hypothesis import strategies as st
from kombu.exceptions import OperationalError

from core.backoff import backoff_delay
from core.outbox.queries import OutboxRow
from core.settings import Settings
from relay.batch import poison_reason
from relay.broker import is_unreachable
from relay.celery_app import create_celery_app
from relay.durations import parse_duration
from relay.messages import RedisMessageBuilder
from relay.reprs import kwargs_repr


def test_backoff_doubles_from_base_with_equal_jitter() -> None:
    assert [backoff_delay(n, base=1.0, cap=300.0, rand=lambda: 1.0) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert [backoff_delay(n, base=1.0, cap=300.0, rand=lambda: 0.0) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]


@given(failures=st.integers(1, 10_000), base=st.floats(0.001, 60), cap=st.floats(0.001, 3600), rand=st.floats(0, 1))
def test_backoff_stays_between_half_step_and_cap(failures: int, base: float, cap: float, rand: float) -> None:
    delay = backoff_delay(failures, base=base, cap=cap, rand=lambda: rand)
    step = min(cap, base * 2.0 ** min(failures - 1, 62))
    assert step / 2 <= delay <= step <= cap


def test_backoff_rejects_zero_failures() -> None:
    with pytest.raises(ValueError, match="failures must be >= 1"):
        backoff_delay(0, base=1.0, cap=10.0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7d", timedelta(days=7)),
        ("12h", timedelta(hours=12)),
        ("30m", timedelta(minutes=30)),
        ("45s", timedelta(seconds=45)),
        ("2w", timedelta(weeks=2)),
        ("1d12h", timedelta(days=1, hours=12)),
        ("1.5h", timedelta(minutes=90)),
        ("0.5s", timedelta(milliseconds=500)),
        ("1s", timedelta(seconds=1)),
        (" 7D ", timedelta(days=7)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "7", "d", "7x", "-7d", "0d", "7 d", "seven days", "7d-1h"])
def test_parse_duration_rejects_nonsense(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=40,
)


@given(kwargs=st.dictionaries(st.text(max_size=10), json_values, max_size=6), maxlevels=st.integers(0, 4))
def test_kwargs_repr_is_exactly_celerys_saferepr(kwargs: dict[str, Any], maxlevels: int) -> None:
    assert kwargs_repr(kwargs, 1024, maxlevels) == saferepr(kwargs, 1024, maxlevels=maxlevels)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"a": "it's"},
        {"a": 'say "hi"'},
        {"a": "back\\slash"},
        {"a": "new\nline"},
        {"a": "x" * 2000},
        {"a": {"b": {"c": {"d": 1}}}},
        {"a": [[[[1]]]]},
        {"a": 1.5, "b": None, "c": True, "d": [], "e": {}},
        {"é": "ü", "a": "\u2028"},
    ],
)
def test_kwargs_repr_edge_cases(kwargs: dict[str, Any]) -> None:
    assert kwargs_repr(kwargs, 1024, 3) == saferepr(kwargs, 1024, maxlevels=3)


def _builder(**transport_options: Any) -> RedisMessageBuilder:
    app = create_celery_app(Settings(_env_file=None, celery_broker_url_override="redis://localhost:1/0"))
    app.conf.broker_transport_options = transport_options
    return RedisMessageBuilder(app, "q")


def test_message_key_follows_kombus_priority_lists_and_prefix() -> None:
    builder = _builder()
    assert builder.build("id", "t", {})[0] == "q"
    assert builder.build("id", "t", {}, priority=5)[0] == "q\x06\x163"
    assert builder.build("id", "t", {}, priority=9)[0] == "q\x06\x169"
    assert _builder(global_keyprefix="app:").build("id", "t", {})[0] == "app:q"


def test_builder_rejects_what_a_worker_could_not_run() -> None:
    builder = _builder()
    with pytest.raises(TypeError, match="mapping"):
        builder.build("id", "t", [1, 2])
    with pytest.raises(TypeError):
        builder.build("id", "t", {"not_json": object()})


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.ConnectionError("Connection refused"),
        redis.exceptions.TimeoutError("Timeout reading from socket"),
        redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory"),
        redis.exceptions.AuthenticationError("invalid password"),
        redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
        redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
        redis.exceptions.ResponseError("MISCONF Redis is configured to save RDB snapshots, but it's failing"),
        OperationalError("[Errno 111] Connection refused"),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError(),
    ],
)
def test_errors_that_mean_the_broker_cannot_take_any_message_are_unreachable(error: BaseException) -> None:
    assert is_unreachable(error)


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
        redis.exceptions.DataError("Invalid input of type: 'dict'"),
        TypeError("task keyword arguments must be a mapping"),
        ValueError("cannot serialize"),
    ],
)
def test_errors_about_one_message_are_refusals_not_outages(error: BaseException) -> None:
    assert not is_unreachable(error)


@pytest.mark.parametrize(
    ("task_name", "kwargs", "decode_error", "reason"),
    [
        ("audit_log_transaction", {"transaction_id": "t", "data": {}}, None, None),
        ("send_transaction_email", {}, None, None),  # the worker checks the arguments themselves
        ("audit_log_transaction", None, "undecodable kwargs: Exceeds the limit", "undecodable kwargs"),
        ("audit_log_transaction", [1, 2], None, "kwargs must be a JSON object, got list"),
        ("audit_log_transaction", "text", None, "kwargs must be a JSON object, got str"),
        ("no_such_task", {}, None, "'no_such_task' is not in the contract"),
    ],
)
def test_poison_rows_are_those_no_publish_could_fix(
    task_name: str, kwargs: Any, decode_error: str | None, reason: str | None
) -> None:
    found = poison_reason(OutboxRow(uuid.uuid4(), task_name, kwargs, 0, decode_error))
    assert (found is None) == (reason is None)
    if reason is not None:
        assert found is not None
        assert found.startswith("poison row: ")
        assert reason in found
