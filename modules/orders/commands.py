"""Commands the orders module accepts."""

from datetime import datetime
from uuid import UUID

import msgspec

from app.messages import Command, CommandRejected, count_error, text_error

# The order's invariants. They live here, in the command, so every door refuses the same orders:
# the HTTP edge constructs the command, `/internal/messages` decodes it (both run __post_init__).
MAX_TEXT = 200  # customer id, payment method
MAX_SKU = 100
MAX_LINES = 100
MAX_QUANTITY = 1_000_000
MAX_IDEMPOTENCY_KEY = 255


class InvalidOrder(CommandRejected):
    """The order breaks a rule every order keeps (no lines, a quantity below one, a NUL, …)."""

    status_code = 400
    title = "Invalid order"


class OrderLine(msgspec.Struct, frozen=True, kw_only=True):
    sku: str
    quantity: int

    def __post_init__(self) -> None:
        error = text_error("sku", self.sku, MAX_SKU) or count_error("quantity", self.quantity, 1, MAX_QUANTITY)
        if error:
            raise InvalidOrder(error)


class PlaceOrder(Command):
    """A customer buys these lines; inventory must hold the stock before the order exists."""

    customer_id: str
    lines: tuple[OrderLine, ...]
    payment_method: str
    idempotency_key: str | None = None  # the same key again answers with the first outcome

    def __post_init__(self) -> None:
        error = (
            text_error("customer_id", self.customer_id, MAX_TEXT)
            or text_error("payment_method", self.payment_method, MAX_TEXT)
            or (self.idempotency_key is not None and text_error("idempotency_key", self.idempotency_key, MAX_IDEMPOTENCY_KEY))
            or count_error("number of lines", len(self.lines), 1, MAX_LINES)
        )
        if error:
            raise InvalidOrder(error)


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
