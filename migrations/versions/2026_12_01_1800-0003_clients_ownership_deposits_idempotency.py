"""clients, account ownership, deposits, per-client idempotency keys, the service role

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 09:00:00

- clients: API keys (their SHA-256 only) and when they were revoked.
- accounts.client_id: the owner. Accounts opened before this revision get one revoked client,
  so nobody can use them until an operator decides.
- transactions.kind: 'transfer' or 'deposit' (from_account_id NULL). Every opening balance of
  an existing account becomes a deposit, so that the books balance from the start.
- idempotency_keys: keys scoped per caller, with an expiry; the old global column goes.
- outbox_app: a NOLOGIN role holding exactly the service's privileges on these tables; the
  login role the service connects as is made a member of it (README, "Security").

Downgrade: refuses while deposits exist (their money would have no origin in the old schema);
idempotency keys are dropped, not moved back.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SERVICE_ROLE = "outbox_app"
TABLES = "accounts, transactions, outbox, audit_log, task_runs, clients, idempotency_keys"

_ADOPT_EXISTING_ACCOUNTS = """
WITH legacy AS (
    INSERT INTO clients (id, name, key_hash, revoked_at)
    SELECT gen_random_uuid(), 'accounts opened before authentication',
           encode(sha256(convert_to(gen_random_uuid()::text, 'UTF8')), 'hex'), now()
    WHERE EXISTS (SELECT 1 FROM accounts)
    RETURNING id
)
UPDATE accounts SET client_id = legacy.id FROM legacy
"""

# What transfers do not explain of a balance is what it was opened with: record it as a deposit.
_OPENING_BALANCES_AS_DEPOSITS = """
INSERT INTO transactions (id, kind, from_account_id, to_account_id, amount, currency, status, created_at)
SELECT gen_random_uuid(), 'deposit', NULL, a.id, opening, a.currency, 'SUCCESS', a.created_at
FROM (
    SELECT a.id, a.currency, a.created_at,
           a.balance
           - coalesce((SELECT sum(amount) FROM transactions WHERE to_account_id = a.id), 0)
           + coalesce((SELECT sum(amount) FROM transactions WHERE from_account_id = a.id), 0) AS opening
    FROM accounts a
) AS a
WHERE opening > 0
"""

_MOVE_IDEMPOTENCY_KEYS = """
INSERT INTO idempotency_keys (client_id, key, request_fingerprint, transaction_id, created_at, expires_at)
SELECT a.client_id, t.idempotency_key, t.request_fingerprint, t.id, t.created_at, t.created_at + interval '24 hours'
FROM transactions t JOIN accounts a ON a.id = t.from_account_id
WHERE t.idempotency_key IS NOT NULL AND t.request_fingerprint IS NOT NULL
"""

_GRANT_TO_SERVICE_ROLE = f"""
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{SERVICE_ROLE}') THEN
        BEGIN
            CREATE ROLE {SERVICE_ROLE} NOLOGIN;
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN NULL;  -- another database's migration made it
            WHEN insufficient_privilege THEN
                RAISE WARNING 'role {SERVICE_ROLE} not created: this user may not create roles (README, Security)';
                RETURN;
        END;
    END IF;
    GRANT USAGE ON SCHEMA public TO {SERVICE_ROLE};
    GRANT SELECT, INSERT, UPDATE, DELETE ON {TABLES} TO {SERVICE_ROLE};
    GRANT USAGE ON SEQUENCE audit_log_id_seq TO {SERVICE_ROLE};
    GRANT SELECT ON alembic_version TO {SERVICE_ROLE};
    -- Tables and sequences later migrations create (as this same user) are the service's too.
    ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {SERVICE_ROLE};
    ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE ON SEQUENCES TO {SERVICE_ROLE};
END $$
"""

_REVOKE_FROM_SERVICE_ROLE = f"""
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{SERVICE_ROLE}') THEN
        ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE ALL ON TABLES FROM {SERVICE_ROLE};
        ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE ALL ON SEQUENCES FROM {SERVICE_ROLE};
        REVOKE ALL ON {TABLES} FROM {SERVICE_ROLE};
        REVOKE ALL ON SEQUENCE audit_log_id_seq FROM {SERVICE_ROLE};
        REVOKE ALL ON alembic_version FROM {SERVICE_ROLE};
        REVOKE USAGE ON SCHEMA public FROM {SERVICE_ROLE};
    END IF;
END $$
"""


def upgrade() -> None:
    op.create_table('clients',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_clients')),
    sa.UniqueConstraint('key_hash', name=op.f('uq_clients_key_hash'))
    )

    op.add_column('accounts', sa.Column('client_id', sa.UUID(), nullable=True))
    op.execute(_ADOPT_EXISTING_ACCOUNTS)
    op.alter_column('accounts', 'client_id', nullable=False)
    op.create_foreign_key(op.f('fk_accounts_client_id_clients'), 'accounts', 'clients', ['client_id'], ['id'])

    op.add_column('transactions', sa.Column('kind', sa.String(length=16), server_default='transfer', nullable=False))
    op.alter_column('transactions', 'kind', server_default=None)
    op.alter_column('transactions', 'from_account_id', existing_type=sa.UUID(), nullable=True)
    op.create_check_constraint(op.f('ck_transactions_kind_known'), 'transactions', "kind IN ('transfer', 'deposit')")
    op.create_check_constraint(
        op.f('ck_transactions_source_matches_kind'), 'transactions', "(kind = 'transfer') = (from_account_id IS NOT NULL)"
    )
    op.execute(_OPENING_BALANCES_AS_DEPOSITS)

    op.create_table('idempotency_keys',
    sa.Column('client_id', sa.UUID(), nullable=False),
    sa.Column('key', sa.String(length=255), nullable=False),
    sa.Column('request_fingerprint', sa.String(length=64), nullable=False),
    sa.Column('transaction_id', sa.UUID(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['transaction_id'], ['transactions.id'], name=op.f('fk_idempotency_keys_transaction_id_transactions'), initially='DEFERRED', deferrable=True),
    sa.PrimaryKeyConstraint('client_id', 'key', name=op.f('pk_idempotency_keys'))
    )
    op.create_index(op.f('ix_idempotency_keys_expires_at'), 'idempotency_keys', ['expires_at'], unique=False)
    op.execute(_MOVE_IDEMPOTENCY_KEYS)
    op.drop_constraint(op.f('uq_transactions_idempotency_key'), 'transactions', type_='unique')
    op.drop_column('transactions', 'request_fingerprint')
    op.drop_column('transactions', 'idempotency_key')

    op.execute(_GRANT_TO_SERVICE_ROLE)


def downgrade() -> None:
    deposits = op.get_bind().execute(sa.text("SELECT count(*) FROM transactions WHERE kind = 'deposit'")).scalar_one()
    if deposits:
        raise RuntimeError(
            f"refusing to downgrade below 0003: {deposits} deposits exist, and the old schema cannot record "
            "where their money came from"
        )
    op.execute(_REVOKE_FROM_SERVICE_ROLE)
    op.add_column('transactions', sa.Column('idempotency_key', sa.String(length=255), nullable=True))
    op.add_column('transactions', sa.Column('request_fingerprint', sa.String(length=64), nullable=True))
    op.create_unique_constraint(op.f('uq_transactions_idempotency_key'), 'transactions', ['idempotency_key'])
    op.drop_index(op.f('ix_idempotency_keys_expires_at'), table_name='idempotency_keys')
    op.drop_table('idempotency_keys')
    op.drop_constraint(op.f('ck_transactions_source_matches_kind'), 'transactions', type_='check')
    op.drop_constraint(op.f('ck_transactions_kind_known'), 'transactions', type_='check')
    op.alter_column('transactions', 'from_account_id', existing_type=sa.UUID(), nullable=False)
    op.drop_column('transactions', 'kind')
    op.drop_constraint(op.f('fk_accounts_client_id_clients'), 'accounts', type_='foreignkey')
    op.drop_column('accounts', 'client_id')
    op.drop_table('clients')
