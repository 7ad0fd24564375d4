"""Request and response bodies. Money crosses the wire as a decimal string, never a float."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal
from uuid import UUID

from pydantic import BaseModel, BeforeValidator, ConfigDict, EmailStr, Field, PlainSerializer

from core.money import format_amount, parse_amount

DecimalString = Annotated[
    Decimal,
    BeforeValidator(parse_amount),
    PlainSerializer(format_amount, return_type=str),
    Field(json_schema_extra={"type": "string", "pattern": r"^[0-9]{1,16}(\.[0-9]{1,2})?$", "examples": ["12.50"]}),
]
Money = Annotated[Decimal, PlainSerializer(format_amount, return_type=str)]
# Printable text only: control characters (NUL among them) are no name, and PostgreSQL refuses NUL.
Name = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClientCreate(_Strict):
    name: Name


class ClientOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: UUID
    name: str
    created_at: datetime
    revoked_at: datetime | None


class ClientCreated(BaseModel):
    id: UUID
    name: str
    api_key: str = Field(description="Shown this once: only its hash is stored.")


class AccountCreate(_Strict):
    owner_email: EmailStr
    currency: str = Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code, e.g. EUR")


class AccountOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: UUID
    client_id: UUID
    owner_email: str
    currency: str
    balance: Money
    created_at: datetime


class TransferCreate(_Strict):
    from_account_id: UUID
    to_account_id: UUID
    amount: DecimalString


class DepositCreate(_Strict):
    amount: DecimalString


class TransactionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: UUID
    kind: Literal["transfer", "deposit"]
    from_account_id: UUID | None = Field(description="None for a deposit")
    to_account_id: UUID
    amount: Money
    currency: str
    status: str
    created_at: datetime


class MessageOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: UUID
    task_name: str
    state: str
    attempts: int
    republishes: int
    published_at: datetime | None
    completed_at: datetime | None
    last_error: str | None = Field(None, description="Only in the operator's view (it names internal systems).")


class TransactionDetail(TransactionOut):
    messages: list[MessageOut]


class ErrorBody(BaseModel):
    code: str
    message: str
    details: list[dict[str, object]] = []


class ErrorOut(BaseModel):
    error: ErrorBody
