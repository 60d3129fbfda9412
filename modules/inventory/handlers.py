"""One function per inventory command, query and subscribed event."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from uuid import UUID

from app.mediator import Mediator
from app.messages import Unavailable
from app.settings import Settings
from app.uow import UnitOfWork
from modules.inventory.aggregate import Stock
from modules.inventory.commands import AddStock, ReserveStock, UnknownSku
from modules.inventory.queries import GetStockLevel, StockLevelView
from modules.orders.queries import GetOrderPlacement
from modules.payments.events import PaymentCaptured, PaymentDeclined

log = logging.getLogger(__name__)

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


async def _confirm(uow: UnitOfWork, order_id: UUID) -> None:
    """The order exists: its reservation no longer expires."""
    async with uow:
        conn = await uow.transaction()
        await conn.execute(
            "UPDATE inventory_reservations SET status = 'confirmed', updated_at = now()"
            " WHERE order_id = $1 AND status = 'reserved'",
            order_id,
        )
        await uow.commit()


async def commit_reservation(event: PaymentCaptured, uow: UnitOfWork) -> None:
    await _settle(uow, event.order_id, "committed", lambda stock: stock.commit(event.order_id))


async def release_reservation(event: PaymentDeclined, uow: UnitOfWork) -> None:
    await _settle(uow, event.order_id, "released", lambda stock: stock.release(event.order_id, "payment declined"))


async def _settle(uow: UnitOfWork, order_id: UUID, status: str, decide: Callable[[Stock], None]) -> None:
    async with uow:
        conn = await uow.transaction()
        rows = await conn.fetch(
            "UPDATE inventory_reservations SET status = $2, updated_at = now()"
            " WHERE order_id = $1 AND status IN ('reserved', 'confirmed') RETURNING sku",
            order_id,
            status,
        )
        for row in sorted(rows, key=lambda r: r["sku"]):
            decide(await uow.get(Stock, row["sku"]))
        await uow.commit()


async def release_unconfirmed_reservations(
    new_uow: Callable[[], UnitOfWork], mediator: Mediator, settings: Settings
) -> None:
    """If a process dies between ReserveStock and OrderPlaced the hold would leak: give back every
    hold still only reserved after the reservation TTL whose order does not exist, and confirm
    the holds of orders that do. Holds are confirmed here, lazily, not by a subscription to
    OrderPlaced: nearly every hold is committed or released by its payment's outcome within the
    TTL, so that subscription was one outbox delivery per order spent on nothing."""
    ttl = settings.reservation_ttl_seconds
    while True:
        await asyncio.sleep(min(max(ttl / 4, 0.05), 15))
        try:
            await release_expired(new_uow, mediator, ttl)
        except Exception:  # keep sweeping; the next round retries
            log.exception("reservation sweep failed")


async def release_expired(new_uow: Callable[[], UnitOfWork], mediator: Mediator, ttl: float) -> int:
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
    for order_id in orders:
        try:
            placed = (await mediator.ask(GetOrderPlacement(order_id=order_id))).placed
        except Unavailable:
            return released  # orders cannot tell us now: never release a hold it may own
        if placed:  # the confirmation is still on its way through the outbox
            await _confirm(new_uow(), order_id)
            continue
        await _settle(new_uow(), order_id, "released", lambda stock, o=order_id: stock.release(o, "never confirmed"))
        released += 1
    return released
