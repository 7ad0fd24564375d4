"""Money rules. Pure: no database, no framework.

An amount crosses the wire as a string of ASCII digits with an optional point and at most two
decimals ("12", "12.5", "12.50"). Nothing else is an amount: no sign, exponent, underscore,
whitespace, non-ASCII digit or JSON number, and nothing is ever rounded.
"""

from __future__ import annotations

import re
from decimal import Decimal

CENTS = Decimal("0.01")
# What NUMERIC(18, 2) holds: no balance (and so no amount) may exceed it.
LARGEST_BALANCE = Decimal("9999999999999999.99")
# [0-9], not \d: \d also matches other scripts' digits ("١٢").
_AMOUNT = re.compile(r"[0-9]{1,16}(?:\.[0-9]{1,2})?")
_FORM = 'a decimal string of digits with at most 2 decimal places, such as "12.50"'


def parse_amount(raw: object) -> Decimal:
    """The exact Decimal an amount string stands for. Raises ValueError with a message fit for the caller."""
    if not isinstance(raw, str):
        raise ValueError(f"amount must be {_FORM}, not a JSON {_json_type(raw)}")
    if _AMOUNT.fullmatch(raw) is None:
        raise ValueError(f"amount must be {_FORM}")
    return Decimal(raw)


def check_transfer_amount(amount: Decimal, maximum: Decimal) -> Decimal:
    """Return the amount with exactly two decimals, or raise ValueError if it may not be moved.

    `amount` is what parse_amount returned: never rounded here, only given its cents.
    """
    if amount <= 0:
        raise ValueError("amount must be greater than 0")
    exponent = amount.as_tuple().exponent
    if not isinstance(exponent, int) or exponent < -2:
        raise ValueError("amount must have at most 2 decimal places")
    if amount > maximum:
        raise ValueError(f"amount must not exceed {format_amount(maximum)}")
    return amount.quantize(CENTS)


def format_amount(amount: Decimal) -> str:
    """The wire form of money: a string with exactly two decimals."""
    return str(amount.quantize(CENTS))


def _json_type(raw: object) -> str:
    if raw is None:
        return "null"
    if isinstance(raw, bool):
        return "boolean"
    if isinstance(raw, int | float):
        return "number"
    return "array" if isinstance(raw, list) else "object"
