"""Questions the orders module answers."""

from datetime import datetime
from uuid import UUID

import msgspec

from app.messages import Query


class GetOrder(Query):
    """The order as its read model shows it; with `after`, once that position has been applied."""

    order_id: UUID
    after: int | None = None


class OrderLineView(msgspec.Struct, frozen=True, kw_only=True):
    sku: str
    quantity: int


class OrderView(msgspec.Struct, frozen=True, kw_only=True):
    order_id: UUID
    customer_id: str
    status: str
    items: list[OrderLineView]
    payment_method: str
    placed_at: datetime
    updated_at: datetime
