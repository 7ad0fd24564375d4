"""The README stays true to the code: every setting documented, the two commands up front."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.settings import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_every_setting_is_documented(field: str) -> None:
    info = Settings.model_fields[field]
    variable = (info.alias or field).upper()
    assert f"`{variable}`" in README


def test_the_first_screen_says_how_to_run_and_test() -> None:
    first_screen = "\n".join(README.splitlines()[:15])
    assert "make run" in first_screen
    assert "make test" in first_screen
