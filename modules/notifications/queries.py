"""Questions the notifications module answers."""

from datetime import datetime
from uuid import UUID

import msgspec

from app.messages import Query


class ListNotifications(Query):
    """Every notification sent about one order, oldest first."""

    order_id: UUID


class NotificationView(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    order_id: UUID
    kind: str
    message: str
    created_at: datetime
