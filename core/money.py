"""Money rules. Pure: no database, no framework."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

CENTS = Decimal("0.01")


def parse_amount(raw: object) -> Decimal:
    """Parse a decimal amount given as a string or int; floats are refused to keep cents exact.

    Raises ValueError with a message fit for the caller.
    """
    if isinstance(raw, bool) or not isinstance(raw, str | int | Decimal):
        raise ValueError('amount must be a decimal string such as "12.50"')
    try:
        value = Decimal(str(raw).strip())
    except InvalidOperation:
        raise ValueError(f"amount {raw!r} is not a decimal number") from None
    if not value.is_finite():
        raise ValueError("amount must be a finite number")
    return value


def check_transfer_amount(amount: Decimal, maximum: Decimal) -> Decimal:
    """Return the amount quantized to cents, or raise ValueError if it is not a valid transfer amount."""
    if amount <= 0:
        raise ValueError("amount must be greater than 0")
    exponent = amount.normalize().as_tuple().exponent
    if isinstance(exponent, int) and exponent < -2:
        raise ValueError("amount must have at most 2 decimal places")
    if amount > maximum:
        raise ValueError(f"amount must not exceed {maximum}")
    return amount.quantize(CENTS)


def check_initial_balance(amount: Decimal, maximum: Decimal) -> Decimal:
    """Return the opening balance quantized to cents, or raise ValueError."""
    if amount < 0:
        raise ValueError("initial_balance must not be negative")
    exponent = amount.normalize().as_tuple().exponent
    if isinstance(exponent, int) and exponent < -2:
        raise ValueError("initial_balance must have at most 2 decimal places")
    if amount > maximum:
        raise ValueError(f"initial_balance must not exceed {maximum}")
    return amount.quantize(CENTS)


def opening_balance_limit(max_transfer_amount: Decimal) -> Decimal:
    """The largest opening balance: a thousand of the largest transfers."""
    return max_transfer_amount * 1000


def format_amount(amount: Decimal) -> str:
    """The wire form of money: a string with exactly two decimals."""
    return str(amount.quantize(CENTS))
