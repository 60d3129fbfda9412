"""Wiring: inventory's messages, subscriptions and routes."""

import msgspec

from app.wiring import Module, StaleFallback, Subscription
from modules.inventory import api, handlers
from modules.inventory.commands import AddStock, ReserveStock
from modules.inventory.queries import GetStockLevel
from modules.payments.events import PaymentCaptured, PaymentDeclined, PaymentFailed

release_reservation = Subscription("inventory.release_reservation", handlers.release_reservation)

module = Module(
    name="inventory",
    commands={AddStock: handlers.add_stock, ReserveStock: handlers.reserve_stock},
    queries={GetStockLevel: handlers.get_stock_level},
    subscriptions={
        PaymentCaptured: [Subscription("inventory.commit_reservation", handlers.commit_reservation, batch=True)],
        PaymentDeclined: [release_reservation],
        PaymentFailed: [release_reservation],
    },
    controllers=[api.InventoryController],
    background=[handlers.release_orphaned_reservations],
    # a stock level a moment old beats an error for a reader; ReserveStock still asks the live one
    fallbacks={GetStockLevel: StaleFallback(mark=lambda view: msgspec.structs.replace(view, stale=True))},
)
