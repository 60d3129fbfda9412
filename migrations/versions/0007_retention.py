"""Retention of inbox rows and idempotency keys: an index on the age of each, so the purges
delete their oldest rows in small batches without reading the whole table.

The inbox purge also asks, per row, whether its message still has an undelivered outbox row:
that is a lookup in outbox_undelivered_message (0005), so the outbox gets no new index (every
append would pay for one). The inbox index is on a column that only grows, so each delivery adds
its entry at the right edge of the index.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

from app.migrate import run_script

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_script(op, """
    CREATE INDEX inbox_processed ON inbox (processed_at);
    CREATE INDEX orders_idempotency_claimed ON orders_idempotency (claimed_at)
    """)


def downgrade() -> None:
    run_script(op, """
    DROP INDEX orders_idempotency_claimed;
    DROP INDEX inbox_processed
    """)
