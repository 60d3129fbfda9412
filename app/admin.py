"""Token-protected admin API: outbox, dead letters, services. Off unless SWITCHBOARD_ADMIN_TOKEN is set."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from litestar import Controller, Request, get, post
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency
from litestar.exceptions import NotAuthorizedException, NotFoundException
from litestar.handlers import BaseRouteHandler
from litestar.params import FromQuery, PathParameter

from app.db import Database
from app.messages import CommandRejected
from app.registry import STALE_AFTER_BEATS, list_services
from app.relay import dead_letters as dlq


def require_admin_token(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    expected = connection.app.state.admin_token
    given = connection.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if not expected or scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected.encode()):
        raise NotAuthorizedException("a valid admin bearer token is required", headers={"WWW-Authenticate": "Bearer"})


LetterId = Annotated[int, PathParameter(ge=1, le=2**63 - 1)]  # dead_letters.id is a bigint


def _actor(request: Request) -> str:
    return f"admin-api:{request.client.host if request.client else 'unknown'}"


class AdminController(Controller):
    path = "/admin"
    guards = [require_admin_token]
    tags = ["admin"]

    @get("/outbox")
    async def outbox(self, db: NamedDependency[Database]) -> dict[str, Any]:
        return await dlq.outbox_status(db)

    @get("/dead-letters")
    async def dead_letters(
        self,
        db: NamedDependency[Database],
        subscriber: FromQuery[str | None] = None,
        status: FromQuery[str | None] = "parked",
    ) -> list[dict[str, Any]]:
        status = None if status == "all" else status  # as the CLI's `dlq list --status all`
        return await dlq.list_dead_letters(db, subscriber=subscriber, status=status)

    @get("/dead-letters/{letter_id:int}")
    async def dead_letter(self, letter_id: LetterId, db: NamedDependency[Database]) -> dict[str, Any]:
        letter = await dlq.get_dead_letter(db, letter_id)
        if letter is None:
            raise NotFoundException(f"no dead letter {letter_id}")
        return letter

    @post("/dead-letters/{letter_id:int}/replay", status_code=200)
    async def replay(self, letter_id: LetterId, db: NamedDependency[Database], request: Request) -> dict[str, Any]:
        return await self._resolve(dlq.replay, db, letter_id, request)

    @post("/dead-letters/{letter_id:int}/discard", status_code=200)
    async def discard(self, letter_id: LetterId, db: NamedDependency[Database], request: Request) -> dict[str, Any]:
        return await self._resolve(dlq.discard, db, letter_id, request)

    async def _resolve(self, action, db: Database, letter_id: int, request: Request) -> dict[str, Any]:
        done = await action(db, [letter_id], _actor(request))
        if not done:
            letter = await dlq.get_dead_letter(db, letter_id)
            if letter is None:
                raise NotFoundException(f"no dead letter {letter_id}")
            raise CommandRejected(f"dead letter {letter_id} is already {letter['status']}")
        return {"id": letter_id, "status": "replayed" if action is dlq.replay else "discarded"}

    @get("/services")
    async def services(self, db: NamedDependency[Database], request: Request) -> list[dict[str, Any]]:
        """Every registered instance with `live` (heartbeat within 3 intervals); stale ones are
        listed until a live instance's heartbeat prunes them."""
        settings = request.app.state.runtime.settings
        return await list_services(db, settings.heartbeat_seconds * STALE_AFTER_BEATS, include_stale=True)
