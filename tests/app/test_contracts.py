"""The contract loader: a module's commands, queries, events and errors, found in its files."""

from __future__ import annotations

import sys

import pytest

from app.contracts import load_contract
from modules.inventory.aggregate import Stock
from modules.inventory.commands import (
    AddStock,
    InsufficientStock,
    InvalidStockRequest,
    ReserveStock,
    UnknownSku,
)
from modules.inventory.events import (
    ReservationCommitted,
    ReservationReleased,
    ReservationRetaken,
    StockAdded,
    StockReserved,
)
from modules.inventory.queries import GetStockLevel
from tests.app.testing_contract.events import Counted


def test_a_modules_contract_is_what_its_three_files_define():
    contract = load_contract("modules.inventory")

    assert contract.commands == [AddStock, ReserveStock]
    assert contract.queries == [GetStockLevel]
    assert contract.events == [StockAdded, StockReserved, ReservationReleased, ReservationCommitted, ReservationRetaken]
    assert contract.errors == [InvalidStockRequest, InsufficientStock, UnknownSku]  # not CommandRejected, which it imports


def test_a_package_with_only_an_events_file_has_only_events():
    contract = load_contract("tests.app.testing_contract")

    assert (contract.commands, contract.queries, contract.events) == ([], [], [Counted])


def test_a_contract_file_that_fails_to_import_something_else_is_an_error(tmp_path, monkeypatch):
    package = tmp_path / "broken_contract"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "commands.py").write_text("import a_library_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "broken_contract", raising=False)

    with pytest.raises(ModuleNotFoundError, match="a_library_that_is_not_installed"):
        load_contract("broken_contract")


async def test_an_event_type_with_no_subscriber_listed_nowhere_is_replayed(system):
    assert StockAdded not in system.catalog.subscribers  # no module subscribes to it
    await system.mediator.send(AddStock(sku="widget", quantity=10))

    async with system.uow() as uow:
        stock = await uow.get(Stock, "widget")

    assert stock.available == 10 and stock.version == 1
