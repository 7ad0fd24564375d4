"""outbox: vacuumed and analyzed after 1,000 changed rows plus 1% of the table, not 20% and 10%

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 11:00:00.000000

The outbox is a queue: every row is updated three times or more on its way to completed, and each
update leaves a dead row version and dead entries in the partial indexes the relay and the
reconciler scan. PostgreSQL's defaults vacuum a table once 20% of it is dead: an outbox keeping a
million completed rows would carry 200,000 dead entries between vacuums. The statistics the claim's
plan is chosen from follow the same rhythm, so they are refreshed at 2% instead of 10%.
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# core.models.OUTBOX_STORAGE holds the same values; a migration keeps its own copy so that it never
# changes when the model does.
STORAGE = {
    'autovacuum_vacuum_threshold': '1000',
    'autovacuum_vacuum_scale_factor': '0.01',
    'autovacuum_analyze_threshold': '1000',
    'autovacuum_analyze_scale_factor': '0.02',
}


def upgrade() -> None:
    options = ', '.join(f'{name} = {value}' for name, value in STORAGE.items())
    op.execute(f'ALTER TABLE outbox SET ({options})')


def downgrade() -> None:
    op.execute(f'ALTER TABLE outbox RESET ({", ".join(STORAGE)})')
