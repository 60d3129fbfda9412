"""The sustained criterion's rows per order come from the modules' subscriptions."""

from __future__ import annotations

from app.messages import Event
from app.wiring import Module, Subscription
from bench.sustained import rows_per_order


class Placed(Event, tag="shop.Placed"):
    pass


class Paid(Event, tag="shop.Paid"):
    pass


class Refunded(Event, tag="shop.Refunded"):
    pass


async def _noop(event) -> None:
    return None


def test_rows_per_order_counts_one_row_per_subscriber_of_each_happy_path_event():
    modules = [
        Module(name="a", subscriptions={Placed: [Subscription("a.x", _noop), Subscription("a.y", _noop)]}),
        Module(
            name="b",
            subscriptions={Paid: [Subscription("b.z", _noop)], Refunded: [Subscription("b.r", _noop)]},
        ),
    ]

    assert rows_per_order(modules, events=("shop.Placed", "shop.Paid")) == 3

