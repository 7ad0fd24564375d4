"""The relay's pure logic: backoff with jitter, operator durations, Celery's kwargsrepr, redis keys."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from celery.utils.saferepr import saferepr
from hypothesis import given
from hypothesis import strategies as st

from core.backoff import backoff_delay
from core.settings import Settings
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
