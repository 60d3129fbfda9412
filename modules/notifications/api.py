"""HTTP for notifications."""

from __future__ import annotations

from uuid import UUID

from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.params import FromQuery

from app.mediator import Mediator
from modules.notifications.queries import ListNotifications, NotificationView


class NotificationController(Controller):
    path = "/notifications"
    tags = ["notifications"]

    @get("/")
    async def list(
        self, order_id: FromQuery[UUID], mediator: NamedDependency[Mediator]
    ) -> list[NotificationView]:
        return await mediator.ask(ListNotifications(order_id=order_id))
