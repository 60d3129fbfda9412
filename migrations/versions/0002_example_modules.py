"""Tables owned by the example modules (each carries its module's prefix).

Revision ID: 0002
Revises: 0001
"""

from alembic import op

from app.migrate import run_script

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_script(op, """
    -- inventory: which order holds which stock, written in the reservation's own transaction
    CREATE TABLE inventory_reservations (
        order_id    uuid NOT NULL,
        sku         text NOT NULL,
        quantity    integer NOT NULL,
        status      text NOT NULL DEFAULT 'reserved'
                    CHECK (status IN ('reserved', 'confirmed', 'committed', 'released')),
        reserved_at timestamptz NOT NULL DEFAULT now(),
        updated_at  timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (order_id, sku)
    );
    CREATE INDEX inventory_reservations_unconfirmed ON inventory_reservations (reserved_at)
        WHERE status = 'reserved';

    -- orders: the read model behind GET /orders/{id}, projected from the order stream
    CREATE TABLE orders_view (
        order_id       uuid PRIMARY KEY,
        customer_id    text NOT NULL,
        status         text NOT NULL,
        items          jsonb NOT NULL,
        payment_method text NOT NULL,
        version        integer NOT NULL,              -- last stream version applied
        placed_at      timestamptz NOT NULL,
        updated_at     timestamptz NOT NULL DEFAULT now()
    );

    -- notifications: what was sent to whom
    CREATE TABLE notifications_sent (
        id          bigserial PRIMARY KEY,
        order_id    uuid NOT NULL,
        kind        text NOT NULL,
        message     text NOT NULL,
        message_id  uuid NOT NULL,                    -- the event it reports (the inbox makes it once)
        created_at  timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX notifications_sent_order ON notifications_sent (order_id);
    """)


def downgrade() -> None:
    op.execute("DROP TABLE notifications_sent, orders_view, inventory_reservations")
