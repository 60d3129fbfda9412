"""orders_view: the projection behind GET /orders/{id}, fed through the outbox."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from app.consistency import wait_until_applied
from app.db import Database
from app.messages import Event, NotFound
from app.uow import UnitOfWork
from modules.orders.events import OrderPaid, OrderPaymentDeclined, OrderPaymentFailed, OrderPlaced
from modules.orders.queries import GetOrder, OrderLineView, OrderView

VIEW = "orders.project_order_view"  # the subscription name, also the read-your-writes key

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


async def project_order_view(event: Event, uow: UnitOfWork) -> None:
    match event:
        case OrderPlaced():
            # staged: the relay writes a run's new rows in one statement, with the run's commit
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
            await uow.commit()
        case OrderPaid():
            await _set_status(await uow.transaction(), event.order_id, "paid")
        case OrderPaymentDeclined():
            await _set_status(await uow.transaction(), event.order_id, "payment_declined")
        case OrderPaymentFailed():
            await _set_status(await uow.transaction(), event.order_id, "payment_failed")


async def _set_status(conn, order_id, status: str) -> None:
    await conn.execute(
        "UPDATE orders_view SET status = $2, version = version + 1, updated_at = now() WHERE order_id = $1",
        order_id,
        status,
    )


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
