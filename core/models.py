"""ORM models. The Alembic migrations create exactly these tables (a test checks for drift)."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from core.outbox.states import ALL_OUTBOX_STATES, ALL_RUN_STATES, OutboxState

MONEY = Numeric(18, 2)
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
_STATES = ", ".join(f"'{state}'" for state in ALL_OUTBOX_STATES)
_RUN_STATES = ", ".join(f"'{state}'" for state in ALL_RUN_STATES)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _now_column() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class Client(Base):
    """A holder of an API key. Only the key's SHA-256 is stored; a revoked client's key stops working."""

    __tablename__ = "clients"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    key_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    created_at: Mapped[datetime] = _now_column()
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Account(Base):
    __tablename__ = "accounts"
    __table_args__ = (
        CheckConstraint("balance >= 0", name="balance_not_negative"),
        CheckConstraint("currency ~ '^[A-Z]{3}$'", name="currency_iso4217"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    # The client that opened it: the only one that may read it or move money out of it.
    client_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("clients.id"), nullable=False)
    owner_email: Mapped[str] = mapped_column(String(320), nullable=False)
    currency: Mapped[str] = mapped_column(String(3), nullable=False)
    balance: Mapped[Decimal] = mapped_column(MONEY, nullable=False)
    created_at: Mapped[datetime] = _now_column()


class Transaction(Base):
    """Every movement of money: a transfer between two accounts, or a deposit into one.

    Money enters only by deposits (from_account_id NULL), so the sum of all balances equals
    the sum of all deposits, and each balance equals its deposits and transfers in, less its
    transfers out.
    """

    __tablename__ = "transactions"
    __table_args__ = (
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint("from_account_id <> to_account_id", name="distinct_accounts"),
        CheckConstraint("kind IN ('transfer', 'deposit')", name="kind_known"),
        CheckConstraint("(kind = 'transfer') = (from_account_id IS NOT NULL)", name="source_matches_kind"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    from_account_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("accounts.id"), nullable=True, index=True
    )
    to_account_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("accounts.id"), nullable=False, index=True
    )
    amount: Mapped[Decimal] = mapped_column(MONEY, nullable=False)
    currency: Mapped[str] = mapped_column(String(3), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    created_at: Mapped[datetime] = _now_column()


class IdempotencyKey(Base):
    """A caller's Idempotency-Key, claimed at the start of the request's transaction.

    Scoped per caller: client_id is the client's id, or the nil UUID for the operator (so no
    foreign key). A key past expires_at counts as unused and may be claimed again.
    """

    __tablename__ = "idempotency_keys"
    __table_args__ = (PrimaryKeyConstraint("client_id", "key"),)

    client_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    key: Mapped[str] = mapped_column(String(255), nullable=False)
    request_fingerprint: Mapped[str] = mapped_column(String(64), nullable=False)
    # Deferred: the claim is written before the transaction row it will answer with.
    transaction_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("transactions.id", deferrable=True, initially="DEFERRED"), nullable=False
    )
    created_at: Mapped[datetime] = _now_column()
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, index=True)


# The outbox is a queue: each row is updated three times or more, so it is vacuumed (and its
# statistics refreshed) after a bounded number of changed rows, not a share of a growing table
# (migration 0005 says why).
OUTBOX_STORAGE = {
    "autovacuum_vacuum_threshold": "1000",
    "autovacuum_vacuum_scale_factor": "0.01",
    "autovacuum_analyze_threshold": "1000",
    "autovacuum_analyze_scale_factor": "0.02",
}


class Outbox(Base):
    """One task to publish. Its id is the Celery task id, end to end."""

    __tablename__ = "outbox"
    __table_args__ = (
        CheckConstraint(f"state IN ({_STATES})", name="state_known"),
        # The relay's claim: pending rows in the order they fall due. The claim filters and orders
        # on next_attempt_at, so rows waiting in backoff (due later) cost it nothing: it reads at
        # most a batch of index entries, however large the backlog.
        Index("ix_outbox_due", "next_attempt_at", "created_at", postgresql_where=text("state = 'pending'")),
        # The reconciler's scan: published rows not yet completed, oldest first.
        Index("ix_outbox_published", "published_at", postgresql_where=text("state = 'published'")),
        # `purge` (oldest completions first) and the reconciler's look at the latest completions.
        Index("ix_outbox_completed", "completed_at", postgresql_where=text("state = 'completed'")),
        {"postgresql_with": OUTBOX_STORAGE},
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    task_name: Mapped[str] = mapped_column(Text, nullable=False)
    kwargs: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    transaction_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("transactions.id"), index=True
    )
    state: Mapped[str] = mapped_column(String(16), nullable=False, server_default=str(OutboxState.PENDING))
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    republishes: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    next_attempt_at: Mapped[datetime] = _now_column()
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now_column()
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set by the worker when a delivery of the message starts, with the time until which that
    # delivery counts as alive; the reconciler re-publishes a started row only once its lease ran
    # out. Not indexed, so that recording them is a HOT update.
    delivery_started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    delivery_lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    deliveries: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    # The W3C traceparent of the span that wrote the row (the API's request); the relay's publish
    # continues that trace and carries it to the worker in the message headers. None outside a span.
    traceparent: Mapped[str | None] = mapped_column(Text)


class AuditLog(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(String(255), nullable=False, unique=True)
    transaction_id: Mapped[str] = mapped_column(String(255), nullable=False, index=True)
    data: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    created_at: Mapped[datetime] = _now_column()


class TaskRun(Base):
    """The worker's record that a task id's effect happened (or is being made, under a lease)."""

    __tablename__ = "task_runs"
    __table_args__ = (CheckConstraint(f"state IN ({_RUN_STATES})", name="state_known"),)

    task_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    task_name: Mapped[str] = mapped_column(Text, nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    # The fencing token of the current lease: release and finish act only with it.
    lease_token: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    # Email sends whose outcome is unknown: +1 when a lease is taken to send, -1 when that send
    # failed in a way that proves the mail server did not accept the message.
    sends_in_doubt: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    started_at: Mapped[datetime] = _now_column()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
