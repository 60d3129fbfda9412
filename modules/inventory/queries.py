"""Questions the inventory module answers."""

import msgspec

from app.messages import Query


class GetStockLevel(Query):
    """How many units of a SKU are free and how many are held by orders."""

    sku: str


class StockLevelView(msgspec.Struct, frozen=True, kw_only=True):
    sku: str
    available: int
    reserved: int
