"""The use cases: open an account, move money (with its outbox rows), read them back."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from uuid import UUID

import asyncpg
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from core.contract import TaskMessage, TransferFacts, transfer_messages
from core.database import create_session_factory
from core.errors import (
    AccountNotFound,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidTransfer,
    TransactionNotFound,
)
from core.models import Account, Outbox, Transaction
from core.outbox import CommitNotifier
from core.unit_of_work import DriverUnitOfWork, UnitOfWork

SUCCESS = "SUCCESS"


@dataclass(frozen=True)
class TransferRequest:
    from_account_id: UUID
    to_account_id: UUID
    amount: Decimal
    idempotency_key: str | None = None

    def fingerprint(self) -> str:
        raw = f"{self.from_account_id}|{self.to_account_id}|{self.amount:.2f}"
        return hashlib.sha256(raw.encode()).hexdigest()


@dataclass(frozen=True)
class TransferResult:
    transaction: Transaction
    created: bool  # False when an idempotent replay returned the original
    facts: TransferFacts | None = None  # set when this call made the transfer


async def create_account(
    session_factory: async_sessionmaker[AsyncSession], owner_email: str, currency: str, balance: Decimal
) -> Account:
    async with UnitOfWork(session_factory) as uow:
        account = Account(id=uuid.uuid4(), owner_email=owner_email, currency=currency, balance=balance)
        uow.session.add(account)
        await uow.session.flush()
        await uow.session.refresh(account)
        await uow.commit()
        return account


async def get_account(session_factory: async_sessionmaker[AsyncSession], account_id: UUID) -> Account:
    async with UnitOfWork(session_factory) as uow:
        account = await uow.session.get(Account, account_id)
        if account is None:
            raise AccountNotFound(f"account {account_id} does not exist")
        return account


# The transfer's SQL, run on the driver connection (see DriverUnitOfWork). asyncpg prepares
# each statement once per connection; the hot path only binds values.
_LOCK_ACCOUNTS = """
SELECT id, owner_email, currency, balance FROM accounts
WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE
"""
# Move the money and record the transaction in one statement (one round trip).
_MOVED = """
moved AS (
    UPDATE accounts SET balance = balance + CASE WHEN id = $2 THEN -$4::numeric ELSE $4::numeric END
    WHERE id IN ($2, $3)
)"""
_INSERT_TRANSACTION = """
INSERT INTO transactions (id, from_account_id, to_account_id, amount, currency, status,
                          idempotency_key, request_fingerprint, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"""
_MOVE_AND_RECORD = f"WITH {_MOVED}{_INSERT_TRANSACTION}"
# The same, plus the transfer's outbox rows: the outbox costs the API only the rows it writes.
_MOVE_AND_RECORD_WITH_OUTBOX = f"""
WITH {_MOVED}, recorded AS ({_INSERT_TRANSACTION}
)
INSERT INTO outbox (id, task_name, kwargs, transaction_id)
SELECT message.id, message.task_name, message.kwargs::jsonb, $1
FROM unnest($10::uuid[], $11::text[], $12::text[]) AS message (id, task_name, kwargs)
"""

SideEffects = Callable[[TransferFacts], list[TaskMessage]]


async def move_money(
    connection: asyncpg.Connection, request: TransferRequest, side_effects: SideEffects | None = None
) -> TransferFacts:
    """Lock both accounts in id order, check funds, move the money and record the transaction.

    With `side_effects`, the tasks it returns for the transfer are written to the outbox by
    the same statement that records the transaction. Runs in the caller's transaction and
    commits nothing. Raises AccountNotFound, InvalidTransfer or InsufficientFunds before
    writing anything.
    """
    if request.from_account_id == request.to_account_id:
        raise InvalidTransfer("from_account_id and to_account_id must differ")
    ids = sorted([request.from_account_id, request.to_account_id])
    accounts = {row["id"]: row for row in await connection.fetch(_LOCK_ACCOUNTS, ids)}
    for account_id in (request.from_account_id, request.to_account_id):
        if account_id not in accounts:
            raise AccountNotFound(f"account {account_id} does not exist")
    source, target = accounts[request.from_account_id], accounts[request.to_account_id]
    if source["currency"] != target["currency"]:
        raise InvalidTransfer(f"currency mismatch: {source['currency']} account to {target['currency']} account")
    if source["balance"] < request.amount:
        raise InsufficientFunds(f"account {source['id']} has insufficient funds for {request.amount:.2f}")
    facts = TransferFacts(
        transaction_id=uuid.uuid4(),
        from_account_id=source["id"],
        to_account_id=target["id"],
        amount=request.amount,
        currency=source["currency"],
        status=SUCCESS,
        created_at=datetime.now(UTC),
        source_email=source["owner_email"],
    )
    values = [
        facts.transaction_id,
        facts.from_account_id,
        facts.to_account_id,
        facts.amount,
        facts.currency,
        facts.status,
        request.idempotency_key,
        request.fingerprint() if request.idempotency_key else None,
        facts.created_at,
    ]
    if side_effects is None:
        await connection.execute(_MOVE_AND_RECORD, *values)
        return facts
    messages = side_effects(facts)
    await connection.execute(
        _MOVE_AND_RECORD_WITH_OUTBOX,
        *values,
        [uuid.uuid4() for _ in messages],
        [message.task_name for message in messages],
        [json.dumps(message.kwargs) for message in messages],
    )
    return facts


class TransferService:
    """Transfers money and writes the transfer's outbox rows in the same transaction.

    `side_effects` decides which tasks a transfer writes to the outbox (the contract's two by
    default; None writes none, which is how the benchmark measures the outbox's cost), and
    `notifier` wakes the relay at commit.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        notifier: CommitNotifier | None,
        side_effects: SideEffects | None = transfer_messages,
    ) -> None:
        self._engine = engine
        self._session_factory = create_session_factory(engine)
        self._notifier = notifier
        self._side_effects = side_effects

    async def transfer(self, request: TransferRequest) -> TransferResult:
        """Commit the transfer and its outbox rows together, or nothing at all.

        With an idempotency key, a repeat of the same request returns the original
        transaction; a different request under the same key raises IdempotencyConflict.
        """
        if request.idempotency_key is not None:
            original = await self._replay(request)
            if original is not None:
                return TransferResult(original, created=False)
        try:
            async with DriverUnitOfWork(self._engine) as uow:
                facts = await move_money(uow.connection, request, self._side_effects)
                if self._notifier is not None:
                    await self._notifier.maybe_notify(uow.connection)
                await uow.commit()
        except asyncpg.UniqueViolationError:
            # Two requests raced with one idempotency key: the loser returns the winner's result.
            original = await self._replay(request) if request.idempotency_key else None
            if original is None:
                raise
            return TransferResult(original, created=False)
        return TransferResult(_transaction_from(facts), created=True, facts=facts)

    async def _replay(self, request: TransferRequest) -> Transaction | None:
        async with UnitOfWork(self._session_factory) as uow:
            original = (
                await uow.session.execute(
                    select(Transaction).where(Transaction.idempotency_key == request.idempotency_key)
                )
            ).scalar_one_or_none()
        if original is not None and original.request_fingerprint != request.fingerprint():
            raise IdempotencyConflict("Idempotency-Key was already used with a different request body")
        return original


def _transaction_from(facts: TransferFacts) -> Transaction:
    return Transaction(
        id=facts.transaction_id,
        from_account_id=facts.from_account_id,
        to_account_id=facts.to_account_id,
        amount=facts.amount,
        currency=facts.currency,
        status=facts.status,
        created_at=facts.created_at,
    )


@dataclass(frozen=True)
class TransactionView:
    transaction: Transaction
    messages: list[Outbox]


async def get_transaction(session_factory: async_sessionmaker[AsyncSession], transaction_id: UUID) -> TransactionView:
    async with UnitOfWork(session_factory) as uow:
        transaction = await uow.session.get(Transaction, transaction_id)
        if transaction is None:
            raise TransactionNotFound(f"transaction {transaction_id} does not exist")
        messages = (
            await uow.session.execute(
                select(Outbox).where(Outbox.transaction_id == transaction_id).order_by(Outbox.task_name)
            )
        ).scalars()
        return TransactionView(transaction, list(messages))
