"""Wiring: notifications' subscription, query and route."""

from app.wiring import Module, Subscription
from modules.notifications import api, handlers
from modules.notifications.queries import ListNotifications
from modules.payments.events import PaymentCaptured, PaymentDeclined, PaymentFailed

# batch: a relay run's notifications are one handler call and one INSERT
notify_customer = Subscription("notifications.notify_customer", handlers.notify_customers, batch=True)

module = Module(
    name="notifications",
    queries={ListNotifications: handlers.list_notifications},
    subscriptions={PaymentCaptured: [notify_customer], PaymentDeclined: [notify_customer], PaymentFailed: [notify_customer]},
    controllers=[api.NotificationController],
)
