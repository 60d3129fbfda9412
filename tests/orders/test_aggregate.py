"""Order: given events -> decide -> new events. No database."""

from uuid import UUID

from modules.orders.aggregate import Order
from modules.orders.events import OrderPaid, OrderPaymentDeclined, OrderPlaced, PlacedLine

ORDER_ID = UUID("00000000-0000-0000-0000-0000000000a1")
PLACED = OrderPlaced(
    order_id=ORDER_ID,
    customer_id="cust-1",
    lines=(PlacedLine(sku="sku-1", quantity=2),),
    payment_method="pm_card_ok",
)


def test_placing_an_order_records_order_placed_with_its_lines():
    order = Order.place(ORDER_ID, "cust-1", [("sku-1", 2)], "pm_card_ok")

    assert order.collect_events() == [PLACED]
    assert order.status == "placed"


def test_marking_a_placed_order_paid_records_order_paid():
    order = Order.rehydrate(ORDER_ID, [PLACED])

    order.mark_paid()

    assert order.collect_events() == [OrderPaid(order_id=ORDER_ID)]


def test_marking_a_paid_order_paid_again_records_nothing():
    order = Order.rehydrate(ORDER_ID, [PLACED, OrderPaid(order_id=ORDER_ID)])

    order.mark_paid()

    assert order.collect_events() == []


def test_marking_an_order_paid_twice_in_one_unit_records_order_paid_once():
    order = Order.rehydrate(ORDER_ID, [PLACED])

    order.mark_paid()
    order.mark_paid()

    assert order.collect_events() == [OrderPaid(order_id=ORDER_ID)]


def test_a_declined_payment_on_a_placed_order_records_order_payment_declined():
    order = Order.rehydrate(ORDER_ID, [PLACED])

    order.mark_payment_declined("card declined")

    assert order.collect_events() == [OrderPaymentDeclined(order_id=ORDER_ID, reason="card declined")]


def test_a_paid_order_ignores_a_later_payment_decline():
    order = Order.rehydrate(ORDER_ID, [PLACED, OrderPaid(order_id=ORDER_ID)])

    order.mark_payment_declined("card declined")

    assert order.collect_events() == []
    assert order.status == "paid"


def test_rehydrating_counts_the_stored_version_and_recording_does_not_change_it():
    order = Order.rehydrate(ORDER_ID, [PLACED])

    order.mark_paid()

    assert (order.stored_version, order.version) == (1, 2)
