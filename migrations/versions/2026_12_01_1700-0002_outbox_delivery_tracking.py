"""outbox delivery tracking, fencing tokens, due and completed indexes

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 17:00:00.000000

- outbox.delivery_started_at / delivery_lease_until / deliveries: the worker records when a
  delivery starts and until when it counts as alive, so the reconciler tells a queued message
  from a lost one.
- task_runs.lease_token: the fencing token of an email lease; sends_in_doubt: sends whose outcome
  is unknown (an operator's replay of such an email needs --force).
- ix_outbox_due replaces ix_outbox_pending: the claim filters and orders on next_attempt_at, so
  rows waiting in backoff cost it nothing.
- ix_outbox_completed: purge, and the reconciler's look at the latest completions.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PENDING = sa.text("state = 'pending'")
COMPLETED = sa.text("state = 'completed'")


def upgrade() -> None:
    op.add_column('outbox', sa.Column('delivery_started_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('outbox', sa.Column('delivery_lease_until', sa.DateTime(timezone=True), nullable=True))
    op.add_column('outbox', sa.Column('deliveries', sa.Integer(), server_default='0', nullable=False))
    op.add_column('task_runs', sa.Column('lease_token', sa.UUID(), nullable=True))
    op.add_column('task_runs', sa.Column('sends_in_doubt', sa.Integer(), server_default='0', nullable=False))
    op.create_index('ix_outbox_due', 'outbox', ['next_attempt_at', 'created_at'], unique=False, postgresql_where=PENDING)
    op.drop_index('ix_outbox_pending', table_name='outbox', postgresql_where=PENDING)
    op.create_index('ix_outbox_completed', 'outbox', ['completed_at'], unique=False, postgresql_where=COMPLETED)


def downgrade() -> None:
    op.drop_index('ix_outbox_completed', table_name='outbox', postgresql_where=COMPLETED)
    op.create_index('ix_outbox_pending', 'outbox', ['created_at'], unique=False, postgresql_where=PENDING)
    op.drop_index('ix_outbox_due', table_name='outbox', postgresql_where=PENDING)
    op.drop_column('task_runs', 'sends_in_doubt')
    op.drop_column('task_runs', 'lease_token')
    op.drop_column('outbox', 'deliveries')
    op.drop_column('outbox', 'delivery_lease_until')
    op.drop_column('outbox', 'delivery_started_at')
