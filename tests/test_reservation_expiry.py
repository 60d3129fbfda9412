"""Inventory settles a hold from its payment's outcome (PaymentCaptured commits it, PaymentDeclined
releases it) and never asks orders; a hold with no outcome past the TTL is an orphan and goes back
on the shelf; a capture that comes after that takes the units again."""

from __future__ import annotations

import json
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

    released = await release_expired(system.uow, ttl=0)

    assert released == 1
    assert await system.mediator.ask(GetStockLevel(sku="widget")) == StockLevelView(
        sku="widget", available=10, reserved=0
    )


async def test_an_unconfirmed_hold_past_its_ttl_is_marked_released(system, db):
    order_id = await orphan_hold(system)

    await release_expired(system.uow, ttl=0)

    assert await reservation_status(db, order_id) == "released"


async def test_an_unconfirmed_hold_within_its_ttl_is_kept(system, db):
    order_id = await orphan_hold(system)

    released = await release_expired(system.uow, ttl=3600)

    assert released == 0
    assert await reservation_status(db, order_id) == "reserved"


async def test_a_hold_within_its_ttl_is_kept_though_its_order_was_placed(system, db):
    order_id = await placed_order(system, quantity=3)

    released = await release_expired(system.uow, ttl=3600)

    assert released == 0
    assert await reservation_status(db, order_id) == "reserved"  # kept, not confirmed: orders is not asked
    assert await system.mediator.ask(GetStockLevel(sku="widget")) == StockLevelView(
        sku="widget", available=7, reserved=3
    )


async def test_a_hold_whose_payment_was_captured_is_committed_and_a_later_sweep_leaves_it(system, relay, db):
    order_id = await placed_order(system, quantity=3)
    await relay.drain()  # OrderPlaced -> payments captures -> PaymentCaptured -> inventory commits
    assert await reservation_status(db, order_id) == "committed"

    released = await release_expired(system.uow, ttl=0)

    assert released == 0
    assert await reservation_status(db, order_id) == "committed"
    assert await system.mediator.ask(GetStockLevel(sku="widget")) == StockLevelView(
        sku="widget", available=7, reserved=0
    )


async def test_a_capture_after_the_hold_was_released_takes_the_units_again(system, relay, db):
    order_id = await placed_order(system, quantity=3)
    assert await release_expired(system.uow, ttl=0) == 1  # the payment outlived the TTL
    assert await system.mediator.ask(GetStockLevel(sku="widget")) == StockLevelView(
        sku="widget", available=10, reserved=0
    )

    await relay.drain()

    assert await reservation_status(db, order_id) == "committed"
    assert await system.mediator.ask(GetStockLevel(sku="widget")) == StockLevelView(
        sku="widget", available=7, reserved=0
    )
    retaken = await db.fetch("SELECT data FROM events WHERE type = 'inventory.ReservationRetaken'")
    assert [json.loads(r["data"])["order_id"] for r in retaken] == [str(order_id)]
    assert await db.fetch("SELECT * FROM dead_letters") == []


async def test_a_capture_after_the_release_whose_units_are_gone_is_dead_lettered(system, relay, db):
    order_id = await placed_order(system, quantity=3)
    await release_expired(system.uow, ttl=0)
    await system.mediator.send(  # someone else takes the shelf: 10 added, 9 of them held now
        ReserveStock(order_id=uuid.uuid4(), lines=(StockLine(sku="widget", quantity=9),))
    )

    await relay.drain()

    dead = await db.fetch("SELECT subscriber, error_type FROM dead_letters")
    assert [(r["subscriber"], r["error_type"]) for r in dead] == [("inventory.commit_reservation", "PermanentError")]
    assert await reservation_status(db, order_id) == "released"  # the failed delivery changed nothing
    assert await system.mediator.ask(GetStockLevel(sku="widget")) == StockLevelView(
        sku="widget", available=1, reserved=9
    )


async def test_releasing_twice_gives_the_stock_back_once(system):
    await orphan_hold(system, quantity=3)
    await release_expired(system.uow, ttl=0)

    released = await release_expired(system.uow, ttl=0)

    assert released == 0
    assert await system.mediator.ask(GetStockLevel(sku="widget")) == StockLevelView(
        sku="widget", available=10, reserved=0
    )
