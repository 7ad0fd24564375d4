"""The contract between the transfer service, the relay and the worker.

The relay publishes by task *name*; the worker registers its tasks under these names
and accepts exactly these keyword arguments. Pure: imports neither Celery nor SQLAlchemy.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Final
from uuid import UUID

from core.money import format_amount

SEND_TRANSACTION_EMAIL: Final = "send_transaction_email"
AUDIT_LOG_TRANSACTION: Final = "audit_log_transaction"
TASK_NAMES: Final = (SEND_TRANSACTION_EMAIL, AUDIT_LOG_TRANSACTION)

# PostgreSQL channel the transfer notifies (at commit) and the relay listens on.
OUTBOX_CHANNEL: Final = "outbox"


@dataclass(frozen=True)
class TransferFacts:
    """What the outbox needs to know about a committed transfer."""

    transaction_id: UUID
    from_account_id: UUID
    to_account_id: UUID
    amount: Decimal
    currency: str
    status: str
    created_at: datetime
    source_email: str


@dataclass(frozen=True)
class DepositFacts:
    """What the outbox needs to know about a committed deposit (money entering an account)."""

    transaction_id: UUID
    account_id: UUID
    amount: Decimal
    currency: str
    status: str
    created_at: datetime
    owner_email: str


@dataclass(frozen=True)
class TaskMessage:
    """One task to publish: its registered name and its JSON-safe keyword arguments."""

    task_name: str
    kwargs: dict[str, Any]


def transfer_messages(facts: TransferFacts) -> list[TaskMessage]:
    """The tasks a successful transfer produces, in the order they are written to the outbox."""
    data = {
        "kind": "transfer",
        "transaction_id": str(facts.transaction_id),
        "from_account_id": str(facts.from_account_id),
        "to_account_id": str(facts.to_account_id),
        "amount": format_amount(facts.amount),
        "currency": facts.currency,
        "status": facts.status,
        "created_at": facts.created_at.isoformat(),
    }
    return [
        TaskMessage(
            SEND_TRANSACTION_EMAIL,
            {"email": facts.source_email, "amount": format_amount(facts.amount), "status": facts.status},
        ),
        TaskMessage(AUDIT_LOG_TRANSACTION, {"transaction_id": str(facts.transaction_id), "data": data}),
    ]


def deposit_messages(facts: DepositFacts) -> list[TaskMessage]:
    """The tasks a deposit produces: the same two tasks, with the deposit's facts.

    The email goes to the owner of the account credited; the audit record has no source account.
    """
    amount = format_amount(facts.amount)
    data = {
        "kind": "deposit",
        "transaction_id": str(facts.transaction_id),
        "from_account_id": None,
        "to_account_id": str(facts.account_id),
        "amount": amount,
        "currency": facts.currency,
        "status": facts.status,
        "created_at": facts.created_at.isoformat(),
    }
    return [
        TaskMessage(SEND_TRANSACTION_EMAIL, {"email": facts.owner_email, "amount": amount, "status": facts.status}),
        TaskMessage(AUDIT_LOG_TRANSACTION, {"transaction_id": str(facts.transaction_id), "data": data}),
    ]
