"""Questions the inventory module answers."""

import msgspec

from app.messages import Query


class GetStockLevel(Query):
    """How many units of a SKU are free and how many are held by orders."""

    sku: str


class StockLevelView(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    sku: str
    available: int
    reserved: int
    stale: bool = False  # True: inventory could not answer; the last level this caller saw
