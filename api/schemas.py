"""Request and response bodies. Money crosses the wire as a decimal string, never a float."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated
from uuid import UUID

from pydantic import BaseModel, BeforeValidator, ConfigDict, EmailStr, Field, PlainSerializer

from core.money import format_amount, parse_amount

DecimalString = Annotated[
    Decimal,
    BeforeValidator(parse_amount),
    PlainSerializer(format_amount, return_type=str),
    Field(json_schema_extra={"type": "string", "examples": ["12.50"]}),
]
Money = Annotated[Decimal, PlainSerializer(format_amount, return_type=str)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AccountCreate(_Strict):
    owner_email: EmailStr
    currency: str = Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code, e.g. EUR")
    initial_balance: DecimalString = Decimal("0")


class AccountOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: UUID
    owner_email: str
    currency: str
    balance: Money
    created_at: datetime


class TransferCreate(_Strict):
    from_account_id: UUID
    to_account_id: UUID
    amount: DecimalString


class TransactionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: UUID
    from_account_id: UUID
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
    last_error: str | None


class TransactionDetail(TransactionOut):
    messages: list[MessageOut]


class ErrorBody(BaseModel):
    code: str
    message: str
    details: list[dict[str, object]] | None = None


class ErrorOut(BaseModel):
    error: ErrorBody
