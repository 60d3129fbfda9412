"""orders_view: the projection behind GET /orders/{id}, written inline -- in the transaction that
appends the order's event (app/uow.py), so it is consistent at commit and costs no delivery."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from app.consistency import wait_until_applied
from app.db import Database
from app.messages import Event, NotFound
from app.uow import UnitOfWork
from modules.orders.events import OrderPaid, OrderPaymentDeclined, OrderPaymentFailed, OrderPlaced
from modules.orders.queries import GetOrder, OrderLineView, OrderView

# The view's subscription before it was projected inline: retired, it only delivers the rows
# written before the upgrade; read-your-writes still waits for those (none are written now).
VIEW = "orders.project_order_view"

_encode = msgspec.json.Encoder().encode


VIEW_COLUMNS = {
    "order_id": "uuid",
    "customer_id": "text",
    "status": "text",
    "items": "jsonb",
    "payment_method": "text",
    "version": "int",
    "placed_at": "timestamptz",
}

STATUS = {OrderPaid: "paid", OrderPaymentDeclined: "payment_declined", OrderPaymentFailed: "payment_failed"}

SET_STATUS_SQL = "UPDATE orders_view SET status = $2, version = version + 1, updated_at = now() WHERE order_id = $1"

# The row is missing only while the retired subscription's OrderPlaced row for this order, written
# before the upgrade, is not delivered yet: write it from the stream's first event. ON CONFLICT
# waits for a concurrent insert of that row and then updates it, so whichever lands first, the
# status ends as this event set it (an OrderPlaced insert never overwrites: DO NOTHING).
UPSERT_FROM_STREAM_SQL = """
INSERT INTO orders_view (order_id, customer_id, status, items, payment_method, version, placed_at)
SELECT $1::uuid, data->>'customer_id', $2::text, data->'lines', data->>'payment_method', 2,
       coalesce((data->>'placed_at')::timestamptz, created_at)
FROM events WHERE stream_id = 'order-' || $1::uuid::text AND version = 1
ON CONFLICT (order_id) DO UPDATE SET status = excluded.status, version = orders_view.version + 1, updated_at = now()
"""


async def project_order_view(event: Event, uow: UnitOfWork) -> None:
    """Inline (modules/orders/module.py): OrderPlaced's row is staged, so it rides in the append
    statement; a status change updates the row in the appending transaction."""
    match event:
        case OrderPlaced():
            row = (
                event.order_id,
                event.customer_id,
                "placed",
                _encode(event.lines).decode(),
                event.payment_method,
                1,
                event.placed_at or datetime.now(UTC),
            )
            uow.stage("orders_view", VIEW_COLUMNS, [row])
        case OrderPaid() | OrderPaymentDeclined() | OrderPaymentFailed():
            conn = await uow.transaction()
            if await conn.execute(SET_STATUS_SQL, event.order_id, STATUS[type(event)]) == "UPDATE 0":
                await conn.execute(UPSERT_FROM_STREAM_SQL, event.order_id, STATUS[type(event)])


async def drain_order_view(event: Event, uow: UnitOfWork) -> None:
    """The retired subscription's handler: applies an outbox row written before the view was
    projected inline, as the subscription did then."""
    await project_order_view(event, uow)
    await uow.commit()


_items = msgspec.json.Decoder(list[OrderLineView])


async def get_order(query: GetOrder, db: Database) -> OrderView:
    if query.after is not None:
        await wait_until_applied(db, VIEW, query.after)
    row = await db.fetchrow(
        "SELECT order_id, customer_id, status, items, payment_method, placed_at, updated_at"
        " FROM orders_view WHERE order_id = $1",
        query.order_id,
    )
    if row is None:
        raise NotFound(f"order {query.order_id} does not exist")
    return OrderView(
        order_id=row["order_id"],
        customer_id=row["customer_id"],
        status=row["status"],
        items=_items.decode(row["items"]),
        payment_method=row["payment_method"],
        placed_at=row["placed_at"],
        updated_at=row["updated_at"],
    )
