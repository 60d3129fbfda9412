"""Wiring: orders' messages, subscriptions and routes."""

from app.wiring import Module, Subscription
from modules.orders import api, handlers, idempotency, read_model
from modules.orders.commands import PlaceOrder
from modules.orders.events import OrderPaid, OrderPaymentDeclined, OrderPaymentFailed, OrderPlaced
from modules.orders.queries import GetOrder
from modules.payments.events import PaymentCaptured, PaymentDeclined, PaymentFailed

module = Module(
    name="orders",
    commands={PlaceOrder: handlers.place_order},
    queries={GetOrder: read_model.get_order},
    # orders_view is written in the transaction that appends the order's events: no delivery
    projections={
        OrderPlaced: read_model.project_order_view,
        OrderPaid: read_model.project_order_view,
        OrderPaymentDeclined: read_model.project_order_view,
        OrderPaymentFailed: read_model.project_order_view,
    },
    subscriptions={
        # batch: a relay run's orders loaded in one SELECT (handlers._mark_each)
        PaymentCaptured: [Subscription("orders.mark_order_paid", handlers.mark_orders_paid, batch=True)],
        PaymentDeclined: [
            Subscription("orders.mark_order_payment_declined", handlers.mark_orders_payment_declined, batch=True)
        ],
        PaymentFailed: [
            Subscription("orders.mark_order_payment_failed", handlers.mark_orders_payment_failed, batch=True)
        ],
    },
    # the view's old subscription: delivers the outbox rows written before it was inline
    retired=[Subscription(read_model.VIEW, read_model.drain_order_view)],
    controllers=[api.OrderController],
    background=[idempotency.forget_expired_keys],
)
