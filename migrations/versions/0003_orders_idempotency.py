"""orders_idempotency: Idempotency-Key of POST /orders, first outcome kept.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

from app.migrate import run_script

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_script(op, """
    CREATE TABLE orders_idempotency (
        key          text PRIMARY KEY,
        fingerprint  text NOT NULL,                   -- sha256 of the request it was first used with
        order_id     uuid NOT NULL,                   -- the order that request creates
        rejection    jsonb,                           -- the first outcome, when it was a 4xx
        claimed_at   timestamptz NOT NULL DEFAULT now()
    )
    """)


def downgrade() -> None:
    op.execute("DROP TABLE orders_idempotency")
