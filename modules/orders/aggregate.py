"""Order: placed, then paid, declined, or failed (its payment could not be made at all)."""

from __future__ import annotations

from datetime import datetime
from typing import Self
from uuid import UUID

from app.aggregate import Aggregate
from app.messages import Event
from modules.orders.events import OrderPaid, OrderPaymentDeclined, OrderPaymentFailed, OrderPlaced, PlacedLine


class Order(Aggregate):
    stream_type = "order"

    def __init__(self, id: UUID) -> None:
        super().__init__(id)
        self.status = "new"

    @classmethod
    def place(
        cls, id: UUID, customer_id: str, lines: list[tuple[str, int]], payment_method: str, placed_at: datetime | None = None
    ) -> Self:
        order = cls(id)
        order._record(
            OrderPlaced(
                order_id=id,
                customer_id=customer_id,
                lines=tuple(PlacedLine(sku=sku, quantity=qty) for sku, qty in lines),
                payment_method=payment_method,
                placed_at=placed_at,
            )
        )
        return order

    def mark_paid(self) -> None:
        if self.status == "placed":  # repeat = no-op: the relay delivers at least once
            self._record(OrderPaid(order_id=self.id))

    def mark_payment_declined(self, reason: str) -> None:
        if self.status == "placed":
            self._record(OrderPaymentDeclined(order_id=self.id, reason=reason))

    def mark_payment_failed(self, reason: str) -> None:
        if self.status == "placed":
            self._record(OrderPaymentFailed(order_id=self.id, reason=reason))

    def _apply(self, event: Event) -> None:
        match event:
            case OrderPlaced():
                self.status = "placed"
            case OrderPaid():
                self.status = "paid"
            case OrderPaymentDeclined():
                self.status = "payment_declined"
            case OrderPaymentFailed():
                self.status = "payment_failed"
