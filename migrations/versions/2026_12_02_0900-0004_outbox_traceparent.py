"""outbox.traceparent: the W3C trace context of the request that wrote the row

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 09:00:00.000000

- outbox.traceparent: the `traceparent` of the span that committed the row (the API's request),
  which the relay's publish continues and carries in the message headers to the worker's task
  span. Nullable: rows written outside a span (tracing off, scripts) have none.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('outbox', sa.Column('traceparent', sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column('outbox', 'traceparent')
