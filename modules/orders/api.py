"""HTTP for orders: each request becomes one message."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated
from uuid import UUID

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, HeaderParameter, JSONBody, QueryParameter

from app.mediator import Mediator
from modules.orders.commands import MAX_LINES, MAX_QUANTITY, MAX_SKU, MAX_TEXT, OrderLine, PlaceOrder
from modules.orders.queries import GetOrder, OrderLineView, OrderView

POSITION_HEADER = "X-Switchboard-Position"

POSITION_MAX = 2**63 - 1  # events.position is a bigint: larger values cannot name a position
# PlaceOrder enforces the same rules (for /internal/messages too); declaring them here as well
# names the offending field in the 400 and documents them in the OpenAPI schema.
NO_NUL = r"^[^\x00]*$"  # PostgreSQL text cannot hold NUL
Text = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TEXT, pattern=NO_NUL)]
Sku = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_SKU, pattern=NO_NUL)]


class LineRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    sku: Sku
    quantity: Annotated[int, msgspec.Meta(gt=0, le=MAX_QUANTITY)]


class PlaceOrderRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    customer_id: Text
    items: Annotated[list[LineRequest], msgspec.Meta(min_length=1, max_length=MAX_LINES)]
    payment_method: Text


class OrderPlacedResponse(msgspec.Struct, frozen=True, kw_only=True):
    order_id: UUID
    status: str
    customer_id: str
    items: list[OrderLineView]
    payment_method: str
    position: int  # read-your-writes token: pass it back as ?after= or X-Switchboard-Position
    placed_at: datetime


class OrderController(Controller):
    path = "/orders"
    tags = ["orders"]

    @post("/", status_code=201)
    async def place(
        self,
        request: Request,
        data: JSONBody[PlaceOrderRequest],
        idempotency_key: Annotated[
            str | None, HeaderParameter(name="Idempotency-Key", min_length=1, max_length=255)
        ] = None,
    ) -> Response[OrderPlacedResponse]:
        # the app's mediator read straight from its state: litestar's dependency injection would
        # resolve it again on every order, the busiest route there is
        accepted = await request.app.state.system.mediator.send(
            PlaceOrder(
                customer_id=data.customer_id,
                lines=tuple(OrderLine(sku=i.sku, quantity=i.quantity) for i in data.items),
                payment_method=data.payment_method,
                idempotency_key=idempotency_key,
            )
        )
        body = OrderPlacedResponse(
            order_id=accepted.order_id,
            status="placed",
            customer_id=data.customer_id,
            items=[OrderLineView(sku=i.sku, quantity=i.quantity) for i in data.items],
            payment_method=data.payment_method,
            position=accepted.position,
            placed_at=accepted.placed_at,
        )
        return Response(
            body,
            status_code=201,
            headers={"Location": f"/orders/{accepted.order_id}", POSITION_HEADER: str(accepted.position)},
        )

    @get("/{order_id:uuid}")
    async def detail(
        self,
        order_id: FromPath[UUID],
        mediator: NamedDependency[Mediator],
        after: Annotated[int | None, QueryParameter(ge=0, le=POSITION_MAX)] = None,
        position: Annotated[int | None, HeaderParameter(name=POSITION_HEADER, ge=0, le=POSITION_MAX)] = None,
    ) -> OrderView:
        return await mediator.ask(GetOrder(order_id=order_id, after=after if after is not None else position))
