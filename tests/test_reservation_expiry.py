"""Holds no OrderPlaced confirmed within the TTL go back on the shelf; holds of placed orders stay."""

from __future__ import annotations

import uuid

from modules.inventory.commands import AddStock, ReserveStock, StockLine
from modules.inventory.handlers import release_expired
from modules.inventory.queries import GetStockLevel, StockLevelView
from modules.orders.commands import OrderLine, PlaceOrder


async def reservation_status(db, order_id: uuid.UUID) -> str:
    return await db.fetchval("SELECT status FROM inventory_reservations WHERE order_id = $1", order_id)


async def orphan_hold(system, quantity: int = 3) -> uuid.UUID:
    """Stock held for an order that never came: ReserveStock sent, no OrderPlaced recorded
    (as when the process dies between the two)."""
    order_id = uuid.uuid4()
    await system.mediator.send(AddStock(sku="widget", quantity=10))
    await system.mediator.send(
        ReserveStock(order_id=order_id, lines=(StockLine(sku="widget", quantity=quantity),))
    )
    return order_id


async def placed_order(system, quantity: int = 3) -> uuid.UUID:
    """An order placed through the mediator; its OrderPlaced still waits in the outbox."""
    await system.mediator.send(AddStock(sku="widget", quantity=10))
    accepted = await system.mediator.send(
        PlaceOrder(
            customer_id="c-1",
            lines=(OrderLine(sku="widget", quantity=quantity),),
            payment_method="pm_card_ok",
        )
    )
    return accepted.order_id


async def test_an_unconfirmed_hold_past_its_ttl_gives_the_stock_back(system):
    await orphan_hold(system, quantity=3)
    assert await system.mediator.ask(GetStockLevel(sku="widget")) == StockLevelView(
        sku="widget", available=7, reserved=3
    )

    released = await release_expired(system.uow, system.mediator, ttl=0)

    assert released == 1
    assert await system.mediator.ask(GetStockLevel(sku="widget")) == StockLevelView(
        sku="widget", available=10, reserved=0
    )


async def test_an_unconfirmed_hold_past_its_ttl_is_marked_released(system, db):
    order_id = await orphan_hold(system)

    await release_expired(system.uow, system.mediator, ttl=0)

    assert await reservation_status(db, order_id) == "released"


async def test_an_unconfirmed_hold_within_its_ttl_is_kept(system, db):
    order_id = await orphan_hold(system)

    released = await release_expired(system.uow, system.mediator, ttl=3600)

    assert released == 0
    assert await reservation_status(db, order_id) == "reserved"


async def test_a_hold_whose_order_was_placed_is_confirmed_not_released(system, db):
    order_id = await placed_order(system, quantity=3)
    assert await reservation_status(db, order_id) == "reserved"  # OrderPlaced not delivered yet

    released = await release_expired(system.uow, system.mediator, ttl=0)

    assert released == 0
    assert await reservation_status(db, order_id) == "confirmed"
    assert await system.mediator.ask(GetStockLevel(sku="widget")) == StockLevelView(
        sku="widget", available=7, reserved=3
    )


async def test_releasing_twice_gives_the_stock_back_once(system):
    await orphan_hold(system, quantity=3)
    await release_expired(system.uow, system.mediator, ttl=0)

    released = await release_expired(system.uow, system.mediator, ttl=0)

    assert released == 0
    assert await system.mediator.ask(GetStockLevel(sku="widget")) == StockLevelView(
        sku="widget", available=10, reserved=0
    )
