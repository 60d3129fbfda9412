"""Facts the inventory module records; other modules may react to them."""

from uuid import UUID

from app.messages import Event


class StockAdded(Event, tag="inventory.StockAdded"):
    """Units arrived and are available."""

    sku: str
    quantity: int


class StockReserved(Event, tag="inventory.StockReserved"):
    """Units are held for an order until it is paid or abandoned."""

    sku: str
    order_id: UUID
    quantity: int


class ReservationReleased(Event, tag="inventory.ReservationReleased"):
    """An order's hold was given back: its payment was declined, or no payment outcome came within
    the reservation TTL (an orphan: the order was never placed)."""

    sku: str
    order_id: UUID
    quantity: int
    reason: str


class ReservationCommitted(Event, tag="inventory.ReservationCommitted"):
    """An order's hold became a sale: the units left the shelf."""

    sku: str
    order_id: UUID
    quantity: int


class ReservationRetaken(Event, tag="inventory.ReservationRetaken"):
    """An order was paid after its hold had been released: its units were taken again and sold."""

    sku: str
    order_id: UUID
    quantity: int
