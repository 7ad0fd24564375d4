"""The use cases: open an account, deposit, move money (with its outbox rows), read them back.

One service, `Ledger`, and one data-access style: every statement runs on the driver's own
connection (asyncpg) inside one DriverUnitOfWork per call, because SQLAlchemy's execution
layer cost more CPU per transfer than the SQL itself (README, "Architecture"). Calls return
plain frozen views. The money rules (core.money) decide what an amount may be; errors are
core.errors' domain errors. Who may call what is decided by the caller's role (the API);
what a caller may see and move is decided here, by ownership:

- an account belongs to the client that opened it;
- a client reads its own accounts, and the transactions that touch them;
- a client moves money only out of its own accounts (to any account);
- the operator reads everything and deposits; it owns no account.

Anything a client may not see is reported exactly as if it did not exist.

The books balance: money enters only by deposits (transactions of kind 'deposit', with no
source account) and transfers only move it, so the sum of all balances is the sum of all
deposits.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from core import money
from core.clients import Principal
from core.contract import DepositFacts, TaskMessage, TransferFacts, deposit_messages, transfer_messages
from core.errors import (
    AccountNotFound,
    BalanceLimitExceeded,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAmount,
    InvalidTransfer,
    TransactionNotFound,
)
from core.outbox import queries as outbox
from core.outbox.notifier import CommitNotifier
from core.telemetry import current_traceparent
from core.unit_of_work import DriverUnitOfWork

SUCCESS = "SUCCESS"
TRANSFER = "transfer"
DEPOSIT = "deposit"

SideEffects = Callable[[TransferFacts], list[TaskMessage]]


@dataclass(frozen=True)
class AccountView:
    id: UUID
    client_id: UUID
    owner_email: str
    currency: str
    balance: Decimal
    created_at: datetime


@dataclass(frozen=True)
class TransactionView:
    id: UUID
    kind: str
    from_account_id: UUID | None  # None for a deposit
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
        return _fingerprint(TRANSFER, self.from_account_id, self.to_account_id, f"{amount:.2f}")


@dataclass(frozen=True)
class DepositRequest:
    account_id: UUID
    amount: Decimal
    idempotency_key: str

    def fingerprint(self, amount: Decimal) -> str:
        return _fingerprint(DEPOSIT, self.account_id, f"{amount:.2f}")


@dataclass(frozen=True)
class TransferResult:
    transaction: TransactionView
    created: bool  # False when an idempotent replay returned the original
    facts: TransferFacts | None = None  # set when this call made the transfer


@dataclass(frozen=True)
class DepositResult:
    transaction: TransactionView
    created: bool  # False when an idempotent replay returned the original


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256("|".join(str(part) for part in parts).encode()).hexdigest()


_ACCOUNT_COLUMNS = "id, client_id, owner_email, currency, balance, created_at"
_INSERT_ACCOUNT = f"""
INSERT INTO accounts (id, client_id, owner_email, currency, balance) VALUES ($1, $2, $3, $4, 0)
RETURNING {_ACCOUNT_COLUMNS}
"""
# $2 NULL: the operator, who reads every account.
_ACCOUNT = f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE id = $1 AND ($2::uuid IS NULL OR client_id = $2)"
_TRANSACTION_COLUMNS = "id, kind, from_account_id, to_account_id, amount, currency, status, created_at"
_TRANSACTION = f"""
SELECT {_TRANSACTION_COLUMNS} FROM transactions t
WHERE id = $1 AND ($2::uuid IS NULL OR EXISTS (
    SELECT 1 FROM accounts a WHERE a.client_id = $2 AND a.id IN (t.from_account_id, t.to_account_id)
))
"""

# Claim the caller's key before anything else. A concurrent request holding the same key makes
# this wait until that request commits (then this one finds the key taken and replays its answer)
# or rolls back (then this one claims it). An expired key is taken over as if it were new.
_CLAIM_KEY = """
INSERT INTO idempotency_keys (client_id, key, request_fingerprint, transaction_id, expires_at)
VALUES ($1, $2, $3, $4, now() + $5::interval)
ON CONFLICT (client_id, key) DO UPDATE
SET request_fingerprint = EXCLUDED.request_fingerprint, transaction_id = EXCLUDED.transaction_id,
    created_at = now(), expires_at = EXCLUDED.expires_at
WHERE idempotency_keys.expires_at <= now()
RETURNING true
"""
_CLAIMED_BY = f"""
SELECT k.request_fingerprint, {", ".join(f"t.{c.strip()}" for c in _TRANSACTION_COLUMNS.split(","))}
FROM idempotency_keys k JOIN transactions t ON t.id = k.transaction_id
WHERE k.client_id = $1 AND k.key = $2
"""
_PURGE_KEYS = """
DELETE FROM idempotency_keys WHERE (client_id, key) IN (
    SELECT client_id, key FROM idempotency_keys WHERE expires_at <= now() LIMIT $1 FOR UPDATE SKIP LOCKED
)
"""

# The transfer's statements (public: bench/minimal_app.py runs exactly these as its yardstick).
LOCK_ACCOUNTS = """
SELECT id, client_id, owner_email, currency, balance FROM accounts
WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE
"""
# Move the money and record the transaction in one statement (one round trip).
_MOVED = """
moved AS (
    UPDATE accounts SET balance = balance + CASE WHEN id = $2 THEN -$4::numeric ELSE $4::numeric END
    WHERE id IN ($2, $3)
)"""
_INSERT_TRANSACTION = f"""
INSERT INTO transactions (id, kind, from_account_id, to_account_id, amount, currency, status, created_at)
VALUES ($1, '{TRANSFER}', $2, $3, $4, $5, $6, $7)"""
_MOVE_AND_RECORD = f"WITH {_MOVED}{_INSERT_TRANSACTION}"
# The same, plus the transfer's outbox rows: the outbox costs the API only the rows it writes.
MOVE_AND_RECORD_WITH_OUTBOX = f"WITH {_MOVED}, recorded AS ({_INSERT_TRANSACTION}\n)" + outbox.insert_messages_sql(
    first_param=8, transaction_param=1
)

_CREDIT = "UPDATE accounts SET balance = balance + $2 WHERE id = $1 RETURNING owner_email, currency"
_RECORD_DEPOSIT = f"""
WITH recorded AS (
    INSERT INTO transactions (id, kind, from_account_id, to_account_id, amount, currency, status, created_at)
    VALUES ($1, '{DEPOSIT}', NULL, $2, $3, $4, $5, $6)
)""" + outbox.insert_messages_sql(first_param=7, transaction_param=1)


class Ledger:
    """Accounts, deposits and transfers. A transaction and its outbox rows commit together, or not at all.

    `side_effects` decides which tasks a transfer writes to the outbox (the contract's two by
    default; None writes none, which is how the benchmark measures the outbox's cost), and
    `notifier` wakes the relay at commit. Idempotency keys count as used for
    `idempotency_retention` after their request.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        notifier: CommitNotifier | None,
        *,
        max_transfer_amount: Decimal,
        idempotency_retention: timedelta = timedelta(hours=24),
        side_effects: SideEffects | None = transfer_messages,
    ) -> None:
        self._engine = engine
        self._notifier = notifier
        self._max_transfer_amount = max_transfer_amount
        self._retention = idempotency_retention
        self._side_effects = side_effects

    async def open_account(self, owner: Principal, owner_email: str, currency: str) -> AccountView:
        """Open an account for `owner` (a client), with a balance of zero."""
        async with DriverUnitOfWork(self._engine) as uow:
            row = await uow.connection.fetchrow(_INSERT_ACCOUNT, uuid.uuid4(), owner.id, owner_email, currency)
            await uow.commit()
        assert row is not None  # INSERT ... RETURNING returns its row
        return AccountView(**dict(row))

    async def account(self, account_id: UUID, caller: Principal) -> AccountView:
        """Raises AccountNotFound, also for another client's account."""
        async with DriverUnitOfWork(self._engine) as uow:
            row = await uow.connection.fetchrow(_ACCOUNT, account_id, _owner_filter(caller))
        if row is None:
            raise AccountNotFound(f"account {account_id} does not exist")
        return AccountView(**dict(row))

    async def transaction(self, transaction_id: UUID, caller: Principal) -> TransactionDetail:
        """The transaction and its outbox rows. Raises TransactionNotFound, also for a transaction
        that touches none of a client's accounts."""
        async with DriverUnitOfWork(self._engine) as uow:
            row = await uow.connection.fetchrow(_TRANSACTION, transaction_id, _owner_filter(caller))
            if row is None:
                raise TransactionNotFound(f"transaction {transaction_id} does not exist")
            messages = await outbox.messages_of_transaction(uow.connection, transaction_id)
        return TransactionDetail(TransactionView(**dict(row)), messages)

    async def transfer(self, request: TransferRequest, caller: Principal) -> TransferResult:
        """Commit the transfer and its outbox rows together, or nothing at all.

        The source must be one of the caller's accounts; the target may be anyone's. With an
        idempotency key, a repeat of the same request (by the same caller, within the retention)
        returns the original transaction, even while the original is still running: it waits
        for it. A different request under the same key raises IdempotencyConflict. Raises
        InvalidAmount, InvalidTransfer, AccountNotFound or InsufficientFunds, having written
        nothing (a refused request leaves its key unused).
        """
        amount = _checked(request.amount, self._max_transfer_amount)
        transaction_id = uuid.uuid4()
        async with DriverUnitOfWork(self._engine) as uow:
            if request.idempotency_key is not None:
                key = (caller.id, request.idempotency_key, request.fingerprint(amount))
                original = await self._claim(uow.connection, *key, transaction_id)
                if original is not None:
                    return TransferResult(original, created=False)
            facts = await _move_money(uow.connection, request, amount, caller, transaction_id, self._side_effects)
            if self._notifier is not None:
                await self._notifier.maybe_notify(uow.connection)
            await uow.commit()
        return TransferResult(_transfer_view(facts), created=True, facts=facts)

    async def deposit(self, request: DepositRequest, caller: Principal) -> DepositResult:
        """Credit the account (anyone's) and write the deposit's outbox rows, in one transaction.

        Idempotent like a transfer, with the key scoped to `caller` (the operator). Raises
        InvalidAmount, AccountNotFound or BalanceLimitExceeded, having written nothing.
        """
        amount = _checked(request.amount, self._max_transfer_amount)
        transaction_id = uuid.uuid4()
        async with DriverUnitOfWork(self._engine) as uow:
            key = (caller.id, request.idempotency_key, request.fingerprint(amount))
            original = await self._claim(uow.connection, *key, transaction_id)
            if original is not None:
                return DepositResult(original, created=False)
            view = await _credit(uow.connection, request.account_id, amount, transaction_id)
            if self._notifier is not None:
                await self._notifier.maybe_notify(uow.connection)
            await uow.commit()
        return DepositResult(view, created=True)

    async def purge_expired_idempotency_keys(self, limit: int = 1_000) -> int:
        """Delete up to `limit` expired keys (skipping any a request holds). Returns how many."""
        async with DriverUnitOfWork(self._engine) as uow:
            result = await uow.connection.execute(_PURGE_KEYS, limit)
            await uow.commit()
        return int(result.split()[-1])

    async def _claim(
        self, connection: asyncpg.Connection, scope: UUID, key: str, fingerprint: str, transaction_id: UUID
    ) -> TransactionView | None:
        """Claim `key` for this request (None), or return the transaction its earlier request made."""
        for _ in range(3):
            if await connection.fetchval(_CLAIM_KEY, scope, key, fingerprint, transaction_id, self._retention):
                return None
            row = await connection.fetchrow(_CLAIMED_BY, scope, key)
            if row is None:
                continue  # purged between the two statements: claim it again
            if row["request_fingerprint"] != fingerprint:
                raise IdempotencyConflict("Idempotency-Key was already used with a different request")
            values = dict(row)
            del values["request_fingerprint"]
            return TransactionView(**values)
        raise IdempotencyConflict("Idempotency-Key is being reused concurrently; try again")


def _owner_filter(caller: Principal) -> UUID | None:
    return None if caller.is_operator else caller.id


def _checked(amount: Decimal, limit: Decimal) -> Decimal:
    try:
        return money.check_transfer_amount(amount, limit)
    except ValueError as exc:
        raise InvalidAmount("amount", str(exc)) from None


def transfer_values(facts: TransferFacts) -> list[Any]:
    """The parameters $1..$7 of MOVE_AND_RECORD(_WITH_OUTBOX), in order."""
    return [
        facts.transaction_id,
        facts.from_account_id,
        facts.to_account_id,
        facts.amount,
        facts.currency,
        facts.status,
        facts.created_at,
    ]


async def _move_money(
    connection: asyncpg.Connection,
    request: TransferRequest,
    amount: Decimal,
    caller: Principal,
    transaction_id: UUID,
    side_effects: SideEffects | None,
) -> TransferFacts:
    """Lock both accounts in id order, check ownership and funds, move the money and record it.

    With `side_effects`, the tasks it returns are written to the outbox by the same statement
    that records the transaction. Runs in the caller's transaction and commits nothing.
    """
    if request.from_account_id == request.to_account_id:
        raise InvalidTransfer("from_account_id and to_account_id must differ")
    ids = sorted([request.from_account_id, request.to_account_id])
    accounts = {row["id"]: row for row in await connection.fetch(LOCK_ACCOUNTS, ids)}
    source = accounts.get(request.from_account_id)
    if source is None or source["client_id"] != caller.id:
        raise AccountNotFound(f"account {request.from_account_id} does not exist")
    target = accounts.get(request.to_account_id)
    if target is None:
        raise AccountNotFound(f"account {request.to_account_id} does not exist")
    if source["currency"] != target["currency"]:
        raise InvalidTransfer(f"currency mismatch: {source['currency']} account to {target['currency']} account")
    if source["balance"] < amount:
        raise InsufficientFunds(f"account {source['id']} has insufficient funds for {amount:.2f}")
    facts = TransferFacts(
        transaction_id=transaction_id,
        from_account_id=source["id"],
        to_account_id=target["id"],
        amount=amount,
        currency=source["currency"],
        status=SUCCESS,
        created_at=datetime.now(UTC),
        source_email=source["owner_email"],
    )
    values = transfer_values(facts)
    if side_effects is None:
        await connection.execute(_MOVE_AND_RECORD, *values)
        return facts
    messages = side_effects(facts)
    message_ids = [uuid.uuid4() for _ in messages]
    # The request's trace context goes on each row: the relay and the worker continue that trace.
    arguments = outbox.message_arguments(message_ids, messages, current_traceparent())
    await connection.execute(MOVE_AND_RECORD_WITH_OUTBOX, *values, *arguments)
    return facts


async def _credit(
    connection: asyncpg.Connection, account_id: UUID, amount: Decimal, transaction_id: UUID
) -> TransactionView:
    """Credit the account and record the deposit with its outbox rows. Commits nothing."""
    try:
        account = await connection.fetchrow(_CREDIT, account_id, amount)
    except asyncpg.NumericValueOutOfRangeError:
        raise BalanceLimitExceeded(f"the deposit would take account {account_id} past its largest balance") from None
    if account is None:
        raise AccountNotFound(f"account {account_id} does not exist")
    facts = DepositFacts(
        transaction_id=transaction_id,
        account_id=account_id,
        amount=amount,
        currency=account["currency"],
        status=SUCCESS,
        created_at=datetime.now(UTC),
        owner_email=account["owner_email"],
    )
    messages = deposit_messages(facts)
    message_ids = [uuid.uuid4() for _ in messages]
    await connection.execute(
        _RECORD_DEPOSIT,
        facts.transaction_id,
        facts.account_id,
        facts.amount,
        facts.currency,
        facts.status,
        facts.created_at,
        *outbox.message_arguments(message_ids, messages, current_traceparent()),
    )
    return TransactionView(
        id=facts.transaction_id,
        kind=DEPOSIT,
        from_account_id=None,
        to_account_id=facts.account_id,
        amount=facts.amount,
        currency=facts.currency,
        status=facts.status,
        created_at=facts.created_at,
    )


def _transfer_view(facts: TransferFacts) -> TransactionView:
    return TransactionView(
        id=facts.transaction_id,
        kind=TRANSFER,
        from_account_id=facts.from_account_id,
        to_account_id=facts.to_account_id,
        amount=facts.amount,
        currency=facts.currency,
        status=facts.status,
        created_at=facts.created_at,
    )
