"""Snapshots: long streams (a SKU's stock) load from their latest snapshot plus the events after it."""

from __future__ import annotations

import uuid

import pytest

from app.eventstore import LOAD_SQL
from modules.inventory.aggregate import Stock


async def add_units(system, sku: str, times: int) -> None:
    uow = system.uow()
    async with uow:
        stock = await uow.find(Stock, sku) or Stock(sku)
        for _ in range(times):
            stock.add(1)
        uow.add(stock)
        await uow.commit()


async def load(system, sku: str) -> Stock:
    uow = system.uow()
    async with uow:
        return await uow.get(Stock, sku)


async def replayed(system, db, sku: str) -> Stock:
    rows = await db.fetch(LOAD_SQL, Stock.stream_id_for(sku))
    return Stock.rehydrate(sku, [system.catalog.decode(r["type"], r["data"]) for r in rows])


N = Stock.snapshot_every


async def test_a_commit_that_crosses_a_multiple_of_the_interval_stores_a_snapshot(system, db):
    await add_units(system, "sku-1", N - 1)
    assert await db.fetchval("SELECT count(*) FROM snapshots") == 0

    await add_units(system, "sku-1", 2)

    row = await db.fetchrow("SELECT stream_id, version FROM snapshots")
    assert tuple(row) == ("stock-sku-1", N + 1)


async def test_a_load_starts_from_the_snapshot_and_applies_the_events_after_it(system, db):
    await add_units(system, "sku-1", N)
    # mark the stored state: a load that replayed from the first event would not see this
    await db.execute("UPDATE snapshots SET state = jsonb_set(state, '{available}', '1000000')")
    await add_units(system, "sku-1", 3)

    stock = await load(system, "sku-1")

    assert (stock.available, stock.version) == (1_000_003, N + 3)


async def test_a_loaded_aggregate_equals_a_full_replay(system, db):
    await add_units(system, "sku-1", 150)  # then 80 events in one commit: 230, past several multiples
    uow = system.uow()
    async with uow:
        stock = await uow.get(Stock, "sku-1")
        orders = [uuid.uuid4() for _ in range(60)]
        for order in orders:
            stock.reserve(order, 2)
        for order in orders[:20]:
            stock.release(order, "test")
        await uow.commit()

    stock = await load(system, "sku-1")
    full = await replayed(system, db, "sku-1")

    assert await db.fetchval("SELECT version FROM snapshots") == 230  # the latest crossing
    assert (stock.available, stock.holds, stock.version) == (full.available, full.holds, full.version)


async def test_a_rolled_back_unit_stores_no_snapshot(system, db):
    uow = system.uow()
    with pytest.raises(RuntimeError):
        async with uow:
            await uow.transaction()
            stock = Stock("sku-1")
            for _ in range(120):
                stock.add(1)
            uow.add(stock)
            async with uow:
                await uow.commit()
            raise RuntimeError("rolled back")

    assert await db.fetchval("SELECT count(*) FROM snapshots") == 0
    assert await db.fetchval("SELECT count(*) FROM events") == 0
