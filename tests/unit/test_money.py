"""The money rules: an amount is exactly what its digits say, or it is refused."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.money import check_transfer_amount, format_amount, parse_amount

FORM = re.compile(r"[0-9]{1,16}(\.[0-9]{1,2})?")


@given(st.decimals(min_value=Decimal("0.01"), max_value=Decimal("999999.99"), places=2))
def test_every_two_decimal_amount_round_trips_exactly(amount: Decimal) -> None:
    assert parse_amount(format_amount(amount)) == amount
    assert check_transfer_amount(parse_amount(str(amount)), Decimal("1000000")) == amount


@given(st.text(max_size=24))
def test_a_string_is_an_amount_only_in_the_one_form(raw: str) -> None:
    try:
        value = parse_amount(raw)
    except ValueError:
        assert FORM.fullmatch(raw) is None
    else:
        assert FORM.fullmatch(raw) is not None
        assert value == Decimal(raw)


@pytest.mark.parametrize(
    "raw",
    [
        "12.34999999999999999999999999999999",
        "1_000",
        "١٢",
        "１２",
        "1e3",
        "1.234",
        "-1",
        "+1",
        " 1",
        "1 ",
        "",
        ".5",
        "5.",
    ],
)
def test_malformed_amounts_are_refused(raw: str) -> None:
    with pytest.raises(ValueError, match="decimal string"):
        parse_amount(raw)


@pytest.mark.parametrize("raw", [12.5, 12, True, None, [], {}])
def test_json_values_that_are_not_strings_are_refused(raw: object) -> None:
    with pytest.raises(ValueError, match="not a JSON"):
        parse_amount(raw)


@pytest.mark.parametrize(
    ("amount", "message"), [("0", "greater than 0"), ("0.00", "greater than 0"), ("10.01", "exceed")]
)
def test_transfer_amounts_are_positive_and_bounded(amount: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_transfer_amount(parse_amount(amount), Decimal("10.00"))


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (12.5, "number"),
        (12, "number"),
        (True, "boolean"),
        (False, "boolean"),
        (None, "null"),
        ([], "array"),
        ({}, "object"),
    ],
)
def test_a_json_value_that_is_not_a_string_is_refused_by_its_json_type(raw: object, kind: str) -> None:
    # The message goes back to the client as the error's text: it names what was sent.
    expected = (
        f'amount must be a decimal string of digits with at most 2 decimal places, such as "12.50", not a JSON {kind}'
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        parse_amount(raw)


@pytest.mark.parametrize(
    ("amount", "message"),
    [
        ("0", "amount must be greater than 0"),
        ("0.001", "amount must have at most 2 decimal places"),
        ("10.01", "amount must not exceed 10.00"),
    ],
)
def test_a_refused_transfer_amount_says_why_in_words_the_client_reads(amount: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        check_transfer_amount(Decimal(amount), Decimal("10.00"))


def test_the_largest_amount_is_allowed_and_one_cent_more_is_not() -> None:
    assert check_transfer_amount(Decimal("10.00"), Decimal("10.00")) == Decimal("10.00")
    assert str(check_transfer_amount(Decimal("7"), Decimal("10.00"))) == "7.00"
    assert str(check_transfer_amount(Decimal("0.01"), Decimal("10.00"))) == "0.01"
