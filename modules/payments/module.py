"""Wiring: payments' subscription and its provider port."""

from app.wiring import Module, Subscription
from modules.orders.events import OrderPlaced
from modules.payments import handlers
from modules.payments.gateway import fake_provider

module = Module(
    name="payments",
    subscriptions={
        OrderPlaced: [
            Subscription(
                "payments.charge_order",
                handlers.charge_order,
                max_attempts=5,
                on_dead_letter=handlers.fail_payment,
                batch=True,
            )
        ],
    },
    providers={"payment_gateway": lambda: fake_provider},
)
