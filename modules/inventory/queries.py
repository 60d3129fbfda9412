"""Questions the inventory module answers."""

import msgspec

from app.messages import Query, text_error
from modules.inventory.commands import MAX_SKU, InvalidStockRequest


class GetStockLevel(Query):
    """How many units of a SKU are free and how many are held by orders."""

    sku: str

    def __post_init__(self) -> None:
        if error := text_error("sku", self.sku, MAX_SKU):  # a NUL would fail in the database
            raise InvalidStockRequest(error)


class StockLevelView(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    sku: str
    available: int
    reserved: int
    stale: bool = False  # True: inventory could not answer; the last level this caller saw
