"""HTTP for inventory: each request becomes one message."""

from __future__ import annotations

import msgspec
from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from typing_extensions import Annotated

from app.mediator import Mediator
from modules.inventory.commands import AddStock
from modules.inventory.queries import GetStockLevel, StockLevelView

Sku = Annotated[str, msgspec.Meta(min_length=1, max_length=100)]


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
    async def level(self, sku: FromPath[str], mediator: NamedDependency[Mediator]) -> StockLevelView:
        return await mediator.ask(GetStockLevel(sku=sku))
