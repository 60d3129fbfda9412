"""HTTP for inventory: each request becomes one message."""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Controller, Response, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody, PathParameter

from app.mediator import Mediator
from modules.inventory.commands import AddStock
from modules.inventory.queries import GetStockLevel, StockLevelView

NO_NUL = r"^[^\x00]*$"  # PostgreSQL text cannot hold NUL: refuse it here (400), not in the database (500)
STALE = {"Warning": '110 - "Response is Stale"'}  # RFC 7234: the level is the last one seen, not a live one
Sku = Annotated[str, msgspec.Meta(min_length=1, max_length=100, pattern=NO_NUL)]


class AddStockRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    sku: Sku
    quantity: Annotated[int, msgspec.Meta(gt=0, le=1_000_000_000)]


class InventoryController(Controller):
    path = "/inventory/items"
    tags = ["inventory"]

    @post("/", status_code=201)
    async def add_stock(
        self, data: JSONBody[AddStockRequest], mediator: NamedDependency[Mediator]
    ) -> StockLevelView:
        await mediator.send(AddStock(sku=data.sku, quantity=data.quantity))
        return await mediator.ask(GetStockLevel(sku=data.sku))

    @get("/{sku:str}")
    async def level(
        self, sku: Annotated[str, PathParameter(pattern=NO_NUL)], mediator: NamedDependency[Mediator]
    ) -> Response[StockLevelView]:
        view = await mediator.ask(GetStockLevel(sku=sku))
        return Response(view, headers=STALE if view.stale else None)
