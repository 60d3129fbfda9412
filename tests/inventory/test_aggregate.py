"""Stock: given events -> decide -> new events. No database."""

import uuid
from uuid import UUID

import pytest

from app.messages import PermanentError
from modules.inventory.aggregate import Stock
from modules.inventory.commands import InsufficientStock
from modules.inventory.events import (
    ReservationCommitted,
    ReservationReleased,
    ReservationRetaken,
    StockAdded,
    StockReserved,
)

SKU = "sku-1"
ORDER_A = UUID("00000000-0000-0000-0000-00000000000a")
ORDER_B = UUID("00000000-0000-0000-0000-00000000000b")
TEN_ADDED = StockAdded(sku=SKU, quantity=10)


def test_adding_stock_records_stock_added_and_makes_units_available():
    stock = Stock(SKU)

    stock.add(5)

    assert stock.collect_events() == [StockAdded(sku=SKU, quantity=5)]
    assert stock.available == 5


def test_reserving_available_units_records_stock_reserved_and_holds_them():
    stock = Stock.rehydrate(SKU, [TEN_ADDED])

    stock.reserve(ORDER_A, 4)

    assert stock.collect_events() == [StockReserved(sku=SKU, order_id=ORDER_A, quantity=4)]
    assert (stock.available, stock.reserved) == (6, 4)


def test_reserving_more_than_is_available_raises_insufficient_stock_and_records_nothing():
    stock = Stock.rehydrate(SKU, [TEN_ADDED, StockReserved(sku=SKU, order_id=ORDER_A, quantity=8)])

    with pytest.raises(InsufficientStock):
        stock.reserve(ORDER_B, 3)

    assert stock.collect_events() == []
    assert stock.available == 2


def test_reserving_again_for_the_same_order_is_a_no_op():
    stock = Stock.rehydrate(SKU, [TEN_ADDED, StockReserved(sku=SKU, order_id=ORDER_A, quantity=4)])

    stock.reserve(ORDER_A, 4)

    assert stock.collect_events() == []
    assert (stock.available, stock.reserved) == (6, 4)


def test_releasing_a_reservation_returns_its_units():
    stock = Stock.rehydrate(SKU, [TEN_ADDED, StockReserved(sku=SKU, order_id=ORDER_A, quantity=4)])

    stock.release(ORDER_A, "payment declined")

    assert stock.collect_events() == [
        ReservationReleased(sku=SKU, order_id=ORDER_A, quantity=4, reason="payment declined")
    ]
    assert (stock.available, stock.reserved) == (10, 0)


def test_releasing_an_order_that_holds_nothing_is_a_no_op():
    stock = Stock.rehydrate(
        SKU,
        [
            TEN_ADDED,
            StockReserved(sku=SKU, order_id=ORDER_A, quantity=4),
            ReservationReleased(sku=SKU, order_id=ORDER_A, quantity=4, reason="payment declined"),
        ],
    )

    stock.release(ORDER_A, "payment declined")

    assert stock.collect_events() == []
    assert stock.available == 10


def test_committing_a_reservation_removes_the_hold_without_returning_units():
    stock = Stock.rehydrate(SKU, [TEN_ADDED, StockReserved(sku=SKU, order_id=ORDER_A, quantity=4)])

    stock.commit(ORDER_A)

    assert stock.collect_events() == [ReservationCommitted(sku=SKU, order_id=ORDER_A, quantity=4)]
    assert (stock.available, stock.reserved) == (6, 0)


def test_committing_twice_records_reservation_committed_once():
    stock = Stock.rehydrate(SKU, [TEN_ADDED, StockReserved(sku=SKU, order_id=ORDER_A, quantity=4)])

    stock.commit(ORDER_A)
    stock.commit(ORDER_A)

    assert stock.collect_events() == [ReservationCommitted(sku=SKU, order_id=ORDER_A, quantity=4)]


def test_restoring_a_stock_snapshot_rebuilds_available_and_holds():
    stock = Stock("sku-1")
    stock.add(10)
    order = uuid.uuid4()
    stock.reserve(order, 3)

    copy = Stock("sku-1")
    copy.restore(stock.snapshot())

    assert (copy.available, copy.holds) == (7, {order: 3})


HELD_THEN_RELEASED = [
    TEN_ADDED,
    StockReserved(sku=SKU, order_id=ORDER_A, quantity=4),
    ReservationReleased(sku=SKU, order_id=ORDER_A, quantity=4, reason="no payment outcome"),
]


def test_retaking_a_released_hold_whose_units_are_free_records_reservation_retaken_and_sells_them():
    stock = Stock.rehydrate(SKU, HELD_THEN_RELEASED)

    stock.retake(ORDER_A, 4)

    assert stock.collect_events() == [ReservationRetaken(sku=SKU, order_id=ORDER_A, quantity=4)]
    assert (stock.available, stock.reserved) == (6, 0)


def test_retaking_a_released_hold_whose_units_are_gone_raises_permanent_error_and_records_nothing():
    stock = Stock.rehydrate(SKU, [*HELD_THEN_RELEASED, StockReserved(sku=SKU, order_id=ORDER_B, quantity=8)])

    with pytest.raises(PermanentError, match="only 2 are available"):
        stock.retake(ORDER_A, 4)

    assert stock.collect_events() == []
    assert (stock.available, stock.reserved) == (2, 8)
