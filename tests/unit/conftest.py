"""Unit tests run in a clean environment: no variable Settings reads, no .env file.

A developer's exports (DATABASE_URL, EMAIL_SEND_DELAY, ...) or a .env in the checkout must not
change what a unit test sees; each test sets what it needs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from core.settings import Settings, get_settings

# Every environment variable Settings reads (case-insensitively), by its lower-case name.
SETTINGS_VARIABLES = frozenset((field.alias or name).lower() for name, field in Settings.model_fields.items())


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Remove every variable Settings reads and make `Settings()` ignore any .env file."""
    for key in list(os.environ):
        if key.lower() in SETTINGS_VARIABLES:
            monkeypatch.delenv(key)
    monkeypatch.setitem(Settings.model_config, "env_file", None)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()
