"""Commands the inventory module accepts, and the rejections they raise."""

from uuid import UUID

import msgspec

from app.messages import Command, CommandRejected, count_error, text_error

# Stock's invariants, checked by the commands themselves so that the HTTP edge and
# `/internal/messages` refuse the same things (both run __post_init__).
MAX_SKU = 100
MAX_ADDED = 1_000_000_000  # units one delivery may add
MAX_RESERVED = 1_000_000  # units one line may hold
MAX_LINES = 100


class InvalidStockRequest(CommandRejected):
    """The message breaks a rule of stock (a quantity below one, an empty or NUL SKU, …)."""

    status_code = 400
    title = "Invalid stock request"


class StockLine(msgspec.Struct, frozen=True, kw_only=True):
    sku: str
    quantity: int

    def __post_init__(self) -> None:
        error = text_error("sku", self.sku, MAX_SKU) or count_error("quantity", self.quantity, 1, MAX_RESERVED)
        if error:
            raise InvalidStockRequest(error)


class AddStock(Command):
    """Receive `quantity` more units of `sku`; creates the item on first delivery."""

    sku: str
    quantity: int

    def __post_init__(self) -> None:
        error = text_error("sku", self.sku, MAX_SKU) or count_error("quantity", self.quantity, 1, MAX_ADDED)
        if error:
            raise InvalidStockRequest(error)


class ReserveStock(Command):
    """Hold every line for `order_id`, all or none. Repeating it for the same order reserves once."""

    idempotent = True
    order_id: UUID
    lines: tuple[StockLine, ...]

    def __post_init__(self) -> None:
        if error := count_error("number of lines", len(self.lines), 1, MAX_LINES):
            raise InvalidStockRequest(error)


class InsufficientStock(CommandRejected):
    """Fewer units are available than the order asks for."""


class UnknownSku(CommandRejected):
    """No stock was ever added for this SKU."""

    status_code = 422
    title = "Unknown SKU"
