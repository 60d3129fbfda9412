"""Facts the orders module records; other modules may react to them."""

from datetime import datetime
from uuid import UUID

import msgspec

from app.messages import Event


class PlacedLine(msgspec.Struct, frozen=True, kw_only=True):
    sku: str
    quantity: int


class OrderPlaced(Event, tag="orders.OrderPlaced"):
    """A customer committed to buy; inventory already holds the stock."""

    order_id: UUID
    customer_id: str
    lines: tuple[PlacedLine, ...]
    payment_method: str
    placed_at: datetime | None = None


class OrderPaid(Event, tag="orders.OrderPaid"):
    """The order's payment was captured."""

    order_id: UUID


class OrderPaymentDeclined(Event, tag="orders.OrderPaymentDeclined"):
    """The customer's payment method was declined; the order will not ship."""

    order_id: UUID
    reason: str


class OrderPaymentFailed(Event, tag="orders.OrderPaymentFailed"):
    """The payment could not be made at all (the charge kept failing); the order will not ship."""

    order_id: UUID
    reason: str
