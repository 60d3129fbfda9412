"""One notification per payment outcome; the relay commits each with its delivery's
acknowledgement, so each one exactly once."""

from __future__ import annotations

from uuid import UUID

from app.db import Database
from app.messages import Event
from app.uow import UnitOfWork
from app.wiring import BatchItem
from modules.notifications.queries import ListNotifications, NotificationView
from modules.payments.events import PaymentCaptured, PaymentDeclined, PaymentFailed

NOTIFICATION_COLUMNS = {"order_id": "uuid", "kind": "text", "message": "text", "message_id": "uuid"}


async def notify_customers(items: list[BatchItem], uow: UnitOfWork) -> None:
    """A batch subscription: the run's notifications staged together, written in one statement
    with the run's commit."""
    rows = [row for item in items if (row := _notification(item.event, item.envelope.message_id))]
    uow.stage("notifications_sent", NOTIFICATION_COLUMNS, rows)
    await uow.commit()


def _notification(event: Event, message_id: UUID) -> tuple | None:
    match event:
        case PaymentCaptured():
            kind, message = "payment_captured", "Your payment was received; your order is on its way."
        case PaymentDeclined(reason=reason):
            kind, message = "payment_declined", f"Your payment was declined ({reason}); the order is cancelled."
        case PaymentFailed():  # the reason is the processor's error: for operators, not customers
            kind, message = "payment_failed", "We could not take your payment; the order is cancelled."
        case _:
            return None
    return (event.order_id, kind, message, message_id)


async def list_notifications(query: ListNotifications, db: Database) -> list[NotificationView]:
    rows = await db.fetch(
        "SELECT id, order_id, kind, message, created_at FROM notifications_sent WHERE order_id = $1 ORDER BY id",
        query.order_id,
    )
    return [NotificationView(**dict(r)) for r in rows]
