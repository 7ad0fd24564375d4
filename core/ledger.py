"""The use cases: open an account, move money (with its outbox rows), read them back.

One service, `Ledger`, and one data-access style: every statement runs on the driver's own
connection (asyncpg) inside one DriverUnitOfWork per call, because SQLAlchemy's execution
layer cost more CPU per transfer than the SQL itself (README, "Architecture"). Calls return
plain frozen views. The money rules (core.money) decide what an amount may be; errors are
core.errors' domain errors.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from uuid import UUID

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from core import money
from core.contract import TaskMessage, TransferFacts, transfer_messages
from core.errors import (
    AccountNotFound,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAmount,
    InvalidTransfer,
    TransactionNotFound,
)
from core.outbox import queries as outbox
from core.outbox.notifier import CommitNotifier
from core.unit_of_work import DriverUnitOfWork

SUCCESS = "SUCCESS"

SideEffects = Callable[[TransferFacts], list[TaskMessage]]


@dataclass(frozen=True)
class AccountView:
    id: UUID
    owner_email: str
    currency: str
    balance: Decimal
    created_at: datetime


@dataclass(frozen=True)
class TransactionView:
    id: UUID
    from_account_id: UUID
    to_account_id: UUID
    amount: Decimal
    currency: str
    status: str
    created_at: datetime


@dataclass(frozen=True)
class TransactionDetail:
    transaction: TransactionView
    messages: list[outbox.MessageView]


@dataclass(frozen=True)
class TransferRequest:
    from_account_id: UUID
    to_account_id: UUID
    amount: Decimal  # as the caller sent it; the ledger checks it against the money rules
    idempotency_key: str | None = None

    def fingerprint(self, amount: Decimal) -> str:
        raw = f"{self.from_account_id}|{self.to_account_id}|{amount:.2f}"
        return hashlib.sha256(raw.encode()).hexdigest()


@dataclass(frozen=True)
class TransferResult:
    transaction: TransactionView
    created: bool  # False when an idempotent replay returned the original
    facts: TransferFacts | None = None  # set when this call made the transfer


_INSERT_ACCOUNT = """
INSERT INTO accounts (id, owner_email, currency, balance) VALUES ($1, $2, $3, $4)
RETURNING id, owner_email, currency, balance, created_at
"""
_ACCOUNT = "SELECT id, owner_email, currency, balance, created_at FROM accounts WHERE id = $1"
_TRANSACTION_COLUMNS = "id, from_account_id, to_account_id, amount, currency, status, created_at"
_TRANSACTION = f"SELECT {_TRANSACTION_COLUMNS} FROM transactions WHERE id = $1"
_BY_IDEMPOTENCY_KEY = f"SELECT {_TRANSACTION_COLUMNS}, request_fingerprint FROM transactions WHERE idempotency_key = $1"
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
_MOVE_AND_RECORD_WITH_OUTBOX = f"WITH {_MOVED}, recorded AS ({_INSERT_TRANSACTION}\n)" + outbox.insert_messages_sql(
    first_param=10, transaction_param=1
)


class Ledger:
    """Accounts and transfers. A transfer and its outbox rows commit together, or not at all.

    `side_effects` decides which tasks a transfer writes to the outbox (the contract's two by
    default; None writes none, which is how the benchmark measures the outbox's cost), and
    `notifier` wakes the relay at commit.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        notifier: CommitNotifier | None,
        *,
        max_transfer_amount: Decimal,
        side_effects: SideEffects | None = transfer_messages,
    ) -> None:
        self._engine = engine
        self._notifier = notifier
        self._max_transfer_amount = max_transfer_amount
        self._side_effects = side_effects

    async def open_account(self, owner_email: str, currency: str, initial_balance: Decimal) -> AccountView:
        """Open an account. Raises InvalidAmount for an opening balance the money rules refuse."""
        balance = _checked(
            "initial_balance",
            money.check_initial_balance,
            initial_balance,
            money.opening_balance_limit(self._max_transfer_amount),
        )
        async with DriverUnitOfWork(self._engine) as uow:
            row = await uow.connection.fetchrow(_INSERT_ACCOUNT, uuid.uuid4(), owner_email, currency, balance)
            await uow.commit()
        assert row is not None  # INSERT ... RETURNING returns its row
        return AccountView(**dict(row))

    async def account(self, account_id: UUID) -> AccountView:
        """Raises AccountNotFound."""
        async with DriverUnitOfWork(self._engine) as uow:
            row = await uow.connection.fetchrow(_ACCOUNT, account_id)
        if row is None:
            raise AccountNotFound(f"account {account_id} does not exist")
        return AccountView(**dict(row))

    async def transaction(self, transaction_id: UUID) -> TransactionDetail:
        """The transaction and its outbox rows. Raises TransactionNotFound."""
        async with DriverUnitOfWork(self._engine) as uow:
            row = await uow.connection.fetchrow(_TRANSACTION, transaction_id)
            if row is None:
                raise TransactionNotFound(f"transaction {transaction_id} does not exist")
            messages = await outbox.messages_of_transaction(uow.connection, transaction_id)
        return TransactionDetail(TransactionView(**dict(row)), messages)

    async def transfer(self, request: TransferRequest) -> TransferResult:
        """Commit the transfer and its outbox rows together, or nothing at all.

        With an idempotency key, a repeat of the same request returns the original
        transaction; a different request under the same key raises IdempotencyConflict.
        Raises InvalidAmount, InvalidTransfer, AccountNotFound or InsufficientFunds, having
        written nothing.
        """
        amount = _checked("amount", money.check_transfer_amount, request.amount, self._max_transfer_amount)
        try:
            async with DriverUnitOfWork(self._engine) as uow:
                if request.idempotency_key is not None:
                    original = await _replay(uow.connection, request, amount)
                    if original is not None:
                        return TransferResult(original, created=False)
                facts = await _move_money(uow.connection, request, amount, self._side_effects)
                if self._notifier is not None:
                    await self._notifier.maybe_notify(uow.connection)
                await uow.commit()
        except asyncpg.UniqueViolationError:
            # Two requests raced with one idempotency key: the loser returns the winner's result.
            if request.idempotency_key is None:
                raise
            async with DriverUnitOfWork(self._engine) as uow:
                original = await _replay(uow.connection, request, amount)
            if original is None:
                raise
            return TransferResult(original, created=False)
        return TransferResult(_view_of(facts), created=True, facts=facts)


def _checked(field: str, rule: Callable[[Decimal, Decimal], Decimal], amount: Decimal, limit: Decimal) -> Decimal:
    try:
        return rule(amount, limit)
    except ValueError as exc:
        raise InvalidAmount(field, str(exc)) from None


async def _replay(connection: asyncpg.Connection, request: TransferRequest, amount: Decimal) -> TransactionView | None:
    row = await connection.fetchrow(_BY_IDEMPOTENCY_KEY, request.idempotency_key)
    if row is None:
        return None
    if row["request_fingerprint"] != request.fingerprint(amount):
        raise IdempotencyConflict("Idempotency-Key was already used with a different request body")
    values = dict(row)
    del values["request_fingerprint"]
    return TransactionView(**values)


async def _move_money(
    connection: asyncpg.Connection, request: TransferRequest, amount: Decimal, side_effects: SideEffects | None
) -> TransferFacts:
    """Lock both accounts in id order, check funds, move the money and record the transaction.

    With `side_effects`, the tasks it returns are written to the outbox by the same statement
    that records the transaction. Runs in the caller's transaction and commits nothing.
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
    if source["balance"] < amount:
        raise InsufficientFunds(f"account {source['id']} has insufficient funds for {amount:.2f}")
    facts = TransferFacts(
        transaction_id=uuid.uuid4(),
        from_account_id=source["id"],
        to_account_id=target["id"],
        amount=amount,
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
        request.fingerprint(amount) if request.idempotency_key else None,
        facts.created_at,
    ]
    if side_effects is None:
        await connection.execute(_MOVE_AND_RECORD, *values)
        return facts
    messages = side_effects(facts)
    ids = [uuid.uuid4() for _ in messages]
    await connection.execute(_MOVE_AND_RECORD_WITH_OUTBOX, *values, *outbox.message_arguments(ids, messages))
    return facts


def _view_of(facts: TransferFacts) -> TransactionView:
    return TransactionView(
        id=facts.transaction_id,
        from_account_id=facts.from_account_id,
        to_account_id=facts.to_account_id,
        amount=facts.amount,
        currency=facts.currency,
        status=facts.status,
        created_at=facts.created_at,
    )
