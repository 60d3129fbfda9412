"""Wiring: orders' messages, subscriptions and routes."""

from app.wiring import Module, Subscription
from modules.orders import api, handlers, idempotency, read_model
from modules.orders.commands import PlaceOrder
from modules.orders.events import OrderPaid, OrderPaymentDeclined, OrderPaymentFailed, OrderPlaced
from modules.orders.queries import GetOrder
from modules.payments.events import PaymentCaptured, PaymentDeclined, PaymentFailed

project_order_view = Subscription(read_model.VIEW, read_model.project_order_view)

module = Module(
    name="orders",
    commands={PlaceOrder: handlers.place_order},
    queries={GetOrder: read_model.get_order},
    subscriptions={
        OrderPlaced: [project_order_view],
        OrderPaid: [project_order_view],
        OrderPaymentDeclined: [project_order_view],
        OrderPaymentFailed: [project_order_view],
        # batch: a relay run's orders loaded in one SELECT (handlers._mark_each)
        PaymentCaptured: [Subscription("orders.mark_order_paid", handlers.mark_orders_paid, batch=True)],
        PaymentDeclined: [
            Subscription("orders.mark_order_payment_declined", handlers.mark_orders_payment_declined, batch=True)
        ],
        PaymentFailed: [
            Subscription("orders.mark_order_payment_failed", handlers.mark_orders_payment_failed, batch=True)
        ],
    },
    controllers=[api.OrderController],
    background=[idempotency.forget_expired_keys],
)
