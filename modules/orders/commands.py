"""Commands the orders module accepts."""

from datetime import datetime
from uuid import UUID

import msgspec

from app.messages import Command, CommandRejected


class OrderLine(msgspec.Struct, frozen=True, kw_only=True):
    sku: str
    quantity: int


class PlaceOrder(Command):
    """A customer buys these lines; inventory must hold the stock before the order exists."""

    customer_id: str
    lines: tuple[OrderLine, ...]
    payment_method: str
    idempotency_key: str | None = None  # the same key again answers with the first outcome


class OrderAccepted(msgspec.Struct, frozen=True, kw_only=True):
    """PlaceOrder's answer: the new order, and the event position to read it back at."""

    order_id: UUID
    position: int
    placed_at: datetime


class IdempotencyKeyReused(CommandRejected):
    """The Idempotency-Key was first used with a different request."""

    status_code = 422
    title = "Idempotency key reused with a different request"


class IdempotencyKeyInUse(CommandRejected):
    """A request with this Idempotency-Key is still being processed; retry shortly."""

    title = "Request with this idempotency key in progress"


class EarlierRejection(CommandRejected):
    """The first request with this Idempotency-Key was rejected; the retry gets the same answer."""

    def __init__(self, detail: str, status_code: int, title: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.title = title
