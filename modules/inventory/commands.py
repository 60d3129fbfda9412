"""Commands the inventory module accepts, and the rejections they raise."""

from uuid import UUID

import msgspec

from app.messages import Command, CommandRejected


class StockLine(msgspec.Struct, frozen=True, kw_only=True):
    sku: str
    quantity: int


class AddStock(Command):
    """Receive `quantity` more units of `sku`; creates the item on first delivery."""

    sku: str
    quantity: int


class ReserveStock(Command):
    """Hold every line for `order_id`, all or none. Repeating it for the same order reserves once."""

    idempotent = True
    order_id: UUID
    lines: tuple[StockLine, ...]


class InsufficientStock(CommandRejected):
    """Fewer units are available than the order asks for."""


class UnknownSku(CommandRejected):
    """No stock was ever added for this SKU."""

    status_code = 422
    title = "Unknown SKU"
