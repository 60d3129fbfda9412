"""One notification per payment outcome; the relay's inbox makes each one exactly once."""

from __future__ import annotations

from app.db import Database
from app.mediator import Envelope
from app.messages import Event
from app.uow import UnitOfWork
from modules.notifications.queries import ListNotifications, NotificationView
from modules.payments.events import PaymentCaptured, PaymentDeclined


async def notify_customer(event: Event, uow: UnitOfWork, envelope: Envelope) -> None:
    match event:
        case PaymentCaptured():
            kind, message = "payment_captured", "Your payment was received; your order is on its way."
        case PaymentDeclined(reason=reason):
            kind, message = "payment_declined", f"Your payment was declined ({reason}); the order is cancelled."
        case _:
            return
    conn = await uow.transaction()
    await conn.execute(
        "INSERT INTO notifications_sent (order_id, kind, message, message_id) VALUES ($1, $2, $3, $4)",
        event.order_id,
        kind,
        message,
        envelope.message_id,
    )


async def list_notifications(query: ListNotifications, db: Database) -> list[NotificationView]:
    rows = await db.fetch(
        "SELECT id, order_id, kind, message, created_at FROM notifications_sent WHERE order_id = $1 ORDER BY id",
        query.order_id,
    )
    return [NotificationView(**dict(r)) for r in rows]
