"""Stock of one SKU: what is free, and what each order holds."""

from __future__ import annotations

from uuid import UUID

from app.aggregate import Aggregate
from app.messages import Event, PermanentError
from modules.inventory.commands import InsufficientStock
from modules.inventory.events import (
    ReservationCommitted,
    ReservationReleased,
    ReservationRetaken,
    StockAdded,
    StockReserved,
)


class Stock(Aggregate):
    stream_type = "stock"
    snapshot_every = 25  # a SKU's stream grows by two events per order: a load reads <= 25 events

    def __init__(self, id: str) -> None:
        super().__init__(id)
        self.available = 0
        self.holds: dict[UUID, int] = {}

    @property
    def reserved(self) -> int:
        return sum(self.holds.values())

    def snapshot(self) -> dict:
        return {"available": self.available, "holds": {str(order): qty for order, qty in self.holds.items()}}

    def restore(self, state: dict) -> None:
        self.available = state["available"]
        self.holds = {UUID(order): qty for order, qty in state["holds"].items()}

    def add(self, quantity: int) -> None:
        self._record(StockAdded(sku=self.id, quantity=quantity))

    def reserve(self, order_id: UUID, quantity: int) -> None:
        if order_id in self.holds:  # the same order again (a retried command): already held
            return
        if quantity > self.available:
            raise InsufficientStock(f"{self.id}: {quantity} requested, {self.available} available")
        self._record(StockReserved(sku=self.id, order_id=order_id, quantity=quantity))

    def release(self, order_id: UUID, reason: str) -> None:
        if order_id in self.holds:  # repeat = no-op: the relay delivers at least once
            self._record(
                ReservationReleased(sku=self.id, order_id=order_id, quantity=self.holds[order_id], reason=reason)
            )

    def commit(self, order_id: UUID) -> None:
        if order_id in self.holds:
            self._record(ReservationCommitted(sku=self.id, order_id=order_id, quantity=self.holds[order_id]))

    def retake(self, order_id: UUID, quantity: int) -> None:
        """The order was paid after its hold was released (the sweeper took it for an orphan): sell
        the units if they are still free. If they are not, no retry can make them so: an operator
        must settle it, so the delivery is dead-lettered where they see it."""
        if quantity > self.available:
            raise PermanentError(
                f"{self.id}: order {order_id} was paid after its hold of {quantity} was released,"
                f" and only {self.available} are available now"
            )
        self._record(ReservationRetaken(sku=self.id, order_id=order_id, quantity=quantity))

    def _apply(self, event: Event) -> None:
        match event:
            case StockAdded(quantity=quantity):
                self.available += quantity
            case StockReserved(order_id=order_id, quantity=quantity):
                self.available -= quantity
                self.holds[order_id] = quantity
            case ReservationReleased(order_id=order_id, quantity=quantity):
                self.available += quantity
                del self.holds[order_id]
            case ReservationCommitted(order_id=order_id):
                del self.holds[order_id]
            case ReservationRetaken(quantity=quantity):
                self.available -= quantity
