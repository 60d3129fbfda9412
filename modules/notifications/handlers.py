"""One notification per payment outcome; the relay commits each with its delivery's
acknowledgement, so each one exactly once."""

from __future__ import annotations

from app.db import Database
from app.messages import Event
from app.uow import UnitOfWork
from app.wiring import Envelope
from modules.notifications.queries import ListNotifications, NotificationView
from modules.payments.events import PaymentCaptured, PaymentDeclined, PaymentFailed

NOTIFICATION_COLUMNS = {"order_id": "uuid", "kind": "text", "message": "text", "message_id": "uuid"}


async def notify_customer(event: Event, uow: UnitOfWork, envelope: Envelope) -> None:
    match event:
        case PaymentCaptured():
            kind, message = "payment_captured", "Your payment was received; your order is on its way."
        case PaymentDeclined(reason=reason):
            kind, message = "payment_declined", f"Your payment was declined ({reason}); the order is cancelled."
        case PaymentFailed():  # the reason is the processor's error: for operators, not customers
            kind, message = "payment_failed", "We could not take your payment; the order is cancelled."
        case _:
            return
    # staged: the relay writes a run's notifications in one statement, with the run's commit
    uow.stage("notifications_sent", NOTIFICATION_COLUMNS, [(event.order_id, kind, message, envelope.message_id)])
    await uow.commit()


async def list_notifications(query: ListNotifications, db: Database) -> list[NotificationView]:
    rows = await db.fetch(
        "SELECT id, order_id, kind, message, created_at FROM notifications_sent WHERE order_id = $1 ORDER BY id",
        query.order_id,
    )
    return [NotificationView(**dict(r)) for r in rows]
