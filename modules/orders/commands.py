"""Commands the orders module accepts."""

from uuid import UUID

import msgspec

from app.messages import Command


class OrderLine(msgspec.Struct, frozen=True, kw_only=True):
    sku: str
    quantity: int


class PlaceOrder(Command):
    """A customer buys these lines; inventory must hold the stock before the order exists."""

    customer_id: str
    lines: tuple[OrderLine, ...]
    payment_method: str


class OrderAccepted(msgspec.Struct, frozen=True, kw_only=True):
    """PlaceOrder's answer: the new order, and the event position to read it back at."""

    order_id: UUID
    position: int
