"""snapshots: the state of long streams every N events, so loads do not replay from the start.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

from app.migrate import run_script

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_script(op, """
    CREATE TABLE snapshots (
        stream_id  text PRIMARY KEY,
        version    integer NOT NULL,                  -- the stream version the state is at
        state      jsonb NOT NULL,                    -- the aggregate's snapshot()
        taken_at   timestamptz NOT NULL DEFAULT now()
    )
    """)


def downgrade() -> None:
    op.execute("DROP TABLE snapshots")
