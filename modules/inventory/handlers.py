"""One function per inventory command, query and subscribed event."""

from __future__ import annotations

from collections.abc import Callable
from uuid import UUID

from app.periodic import every
from app.settings import Settings
from app.uow import UnitOfWork
from app.wiring import BatchItem
from modules.inventory.aggregate import Stock
from modules.inventory.commands import AddStock, ReserveStock, UnknownSku
from modules.inventory.queries import GetStockLevel, StockLevelView
from modules.payments.events import PaymentDeclined, PaymentFailed

RESERVATION_COLUMNS = {"order_id": "uuid", "sku": "text", "quantity": "int"}


async def add_stock(cmd: AddStock, uow: UnitOfWork) -> None:
    async with uow:
        stock = await uow.find(Stock, cmd.sku) or Stock(cmd.sku)
        stock.add(cmd.quantity)
        uow.add(stock)
        await uow.commit()


async def reserve_stock(cmd: ReserveStock, uow: UnitOfWork) -> None:
    wanted: dict[str, int] = {}
    for line in cmd.lines:
        wanted[line.sku] = wanted.get(line.sku, 0) + line.quantity
    async with uow:
        for sku, quantity in sorted(wanted.items()):
            stock = await uow.find(Stock, sku)
            if stock is None:
                raise UnknownSku(f"no stock was ever added for SKU {sku!r}")
            stock.reserve(cmd.order_id, quantity)  # raises InsufficientStock: nothing is kept
        # the holds ride in the statement that appends StockReserved: one round trip, atomic
        uow.stage("inventory_reservations", RESERVATION_COLUMNS, [(cmd.order_id, s, q) for s, q in wanted.items()])
        await uow.commit()


async def get_stock_level(query: GetStockLevel, uow: UnitOfWork) -> StockLevelView:
    async with uow:
        stock = await uow.get(Stock, query.sku)
        return StockLevelView(sku=stock.id, available=stock.available, reserved=stock.reserved)


# The holds' rows move to 'committed' whatever they were, and say what they were: a 'released'
# row is a payment that came after the sweeper gave the units back. ('confirmed' is a status older
# versions wrote; such a hold is settled like a 'reserved' one.) A run's rows are locked in one
# order: (order id, SKU).
COMMIT_HOLDS_SQL = """
WITH was AS (
    SELECT order_id, sku, status FROM inventory_reservations
    WHERE order_id = ANY($1::uuid[]) AND status <> 'committed' ORDER BY order_id, sku FOR UPDATE
)
UPDATE inventory_reservations r SET status = 'committed', updated_at = now()
FROM was WHERE r.order_id = was.order_id AND r.sku = was.sku
RETURNING r.order_id, r.sku, r.quantity, was.status AS was
"""

# Relay runs of commit_reservation deliver at once and their orders share SKUs: without a lock,
# two runs would load the same Stock stream and the later append would lose the race (and its
# whole run would run again, and again). Runs queue per SKU instead, taking their locks in SKU
# order (no deadlock); each is held to the end of its transaction, and the stream is loaded after.
LOCK_STOCKS_SQL = "SELECT pg_advisory_xact_lock(hashtextextended('stock-' || sku, 0)) FROM unnest($1::text[]) AS sku"


async def commit_reservation(items: list[BatchItem], uow: UnitOfWork) -> None:
    """The orders are paid: their holds become sales, even ones released meanwhile (Stock.retake).
    A batch subscription: the run's holds move in one statement, the Stock streams they touch are
    loaded in SKU order (one lock order), and each order's events are recorded under its
    PaymentCaptured's context."""
    async with uow:
        conn = await uow.transaction()
        rows = await conn.fetch(COMMIT_HOLDS_SQL, [item.event.order_id for item in items])
        by_order: dict[UUID, list] = {}
        for row in rows:
            by_order.setdefault(row["order_id"], []).append(row)
        skus = sorted({r["sku"] for r in rows})
        if skus:
            await conn.execute(LOCK_STOCKS_SQL, skus)
        stocks = dict(zip(skus, await uow.get_many(Stock, skus), strict=True))
        for item in items:
            order_id = item.event.order_id
            with item.recording():
                for row in sorted(by_order.get(order_id, ()), key=lambda r: r["sku"]):
                    stock = stocks[row["sku"]]
                    if row["was"] == "released":
                        stock.retake(order_id, row["quantity"])
                    else:
                        stock.commit(order_id)
                await uow.commit()


async def release_reservation(event: PaymentDeclined | PaymentFailed, uow: UnitOfWork) -> None:
    """No payment will come: the order's hold goes back on the shelf."""
    reason = "payment failed" if isinstance(event, PaymentFailed) else "payment declined"
    await _release(uow, event.order_id, reason)


async def _release(uow: UnitOfWork, order_id: UUID, reason: str) -> bool:
    async with uow:
        conn = await uow.transaction()
        rows = await conn.fetch(
            "UPDATE inventory_reservations SET status = 'released', updated_at = now()"
            " WHERE order_id = $1 AND status IN ('reserved', 'confirmed') RETURNING sku",
            order_id,
        )
        for row in sorted(rows, key=lambda r: r["sku"]):
            (await uow.get(Stock, row["sku"])).release(order_id, reason)
        await uow.commit()
    return bool(rows)


async def release_orphaned_reservations(new_uow: Callable[[], UnitOfWork], settings: Settings) -> None:
    """Inventory learns an order's fate from its payment's outcome (PaymentCaptured commits the
    hold, PaymentDeclined releases it), never by asking orders: that call back would make the two
    modules call each other synchronously. A hold that has no outcome after the reservation TTL is
    an orphan -- the process died between ReserveStock and OrderPlaced, so no payment will come --
    and is released. The TTL must outlast the payment subscription's whole retry budget; a capture
    that still comes later takes the units again (commit_reservation)."""
    ttl = settings.reservation_ttl_seconds
    await every(min(max(ttl / 4, 0.05), 15), lambda: release_expired(new_uow, ttl), "reservation sweep")


async def release_expired(new_uow: Callable[[], UnitOfWork], ttl: float) -> int:
    """Release the holds still only reserved `ttl` seconds after they were taken; how many orders'."""
    async with new_uow() as uow:
        orders = [
            r["order_id"]
            for r in await uow.connection.fetch(
                "SELECT DISTINCT order_id FROM inventory_reservations"
                " WHERE status = 'reserved' AND reserved_at < now() - make_interval(secs => $1) LIMIT 100",
                ttl,
            )
        ]
    released = 0
    for order_id in orders:  # one transaction each: a conflict on one SKU delays only its order
        released += await _release(new_uow(), order_id, "no payment outcome within the reservation TTL")
    return released
