"""HTTP for inventory: each request becomes one message."""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Controller, Response, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody, PathParameter

from app.mediator import Mediator
from modules.inventory.commands import MAX_ADDED, MAX_SKU, AddStock
from modules.inventory.queries import GetStockLevel, StockLevelView

# The command enforces the same rules (for /internal/messages too); declaring them here as well
# names the offending field in the 400 and documents them in the OpenAPI schema.
NO_NUL = r"^[^\x00]*$"  # PostgreSQL text cannot hold NUL
STALE = {"Warning": '110 - "Response is Stale"'}  # RFC 7234: the level is the last one seen, not a live one
Sku = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_SKU, pattern=NO_NUL)]


class AddStockRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    sku: Sku
    quantity: Annotated[int, msgspec.Meta(gt=0, le=MAX_ADDED)]


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
