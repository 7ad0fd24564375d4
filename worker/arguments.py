"""The tasks' arguments as the contract (core/contract.py) defines them, checked strictly.

A message that breaks the contract fails at once with InvalidTaskArguments: no retry can fix it.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, EmailStr, Field, ValidationError

from core.money import parse_amount
from worker.errors import InvalidTaskArguments


def _decimal_string(value: str) -> str:
    amount: Decimal = parse_amount(value)
    if amount < 0:
        raise ValueError("amount must not be negative")
    return value


class _Arguments(BaseModel):
    # Strict: "12.5" stays a string, 12.5 (a float) is refused; unknown keys are refused.
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class EmailArguments(_Arguments):
    email: EmailStr
    amount: Annotated[str, AfterValidator(_decimal_string)]
    status: Annotated[str, Field(min_length=1)]


class AuditArguments(_Arguments):
    transaction_id: Annotated[str, Field(min_length=1)]
    data: dict[str, Any]


ArgumentsT = TypeVar("ArgumentsT", bound=_Arguments)


def parse_arguments(model: type[ArgumentsT], args: tuple[Any, ...], kwargs: dict[str, Any]) -> ArgumentsT:
    """Validate a message's arguments. Raises InvalidTaskArguments naming every problem."""
    if args:
        raise InvalidTaskArguments(f"positional arguments are not accepted, got {len(args)}; send keyword arguments")
    try:
        return model.model_validate(kwargs)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in issue['loc']) or 'arguments'}: {issue['msg']}" for issue in error.errors()
        )
        raise InvalidTaskArguments(f"invalid arguments: {problems}") from None
