"""UnitOfWork.get_many: several streams loaded in one SELECT, into the identity map."""

from __future__ import annotations

import uuid

import pytest

from app.messages import NotFound
from modules.orders.aggregate import Order


class Counting:
    """The unit's connection, counting the statements that go through it."""

    def __init__(self, conn) -> None:
        self.conn, self.fetches = conn, 0

    async def fetch(self, *args):
        self.fetches += 1
        return await self.conn.fetch(*args)


async def place(system, n: int) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in range(n)]
    async with system.uow() as uow:
        for id in ids:
            order = Order.place(id, "cust-1", [("sku-1", 1)], "pm_card_ok")
            order.mark_paid()
            uow.add(order)
        await uow.commit()
    return ids


async def test_get_many_loads_every_stream_in_one_select_in_the_order_asked(system):
    ids = await place(system, 5)
    async with system.uow() as uow:
        counting = uow._conn = Counting(uow._conn)
        try:
            orders = await uow.get_many(Order, [ids[3], ids[0], ids[3], *ids[1:3], ids[4]])
            assert counting.fetches == 1
            assert await uow.get(Order, ids[1]) is orders[3]
            await uow.get_many(Order, ids)
            assert counting.fetches == 1  # loaded before: from the identity map
        finally:
            uow._conn = counting.conn
    assert [o.id for o in orders] == [ids[3], ids[0], ids[3], ids[1], ids[2], ids[4]]
    assert orders[0] is orders[2]  # one aggregate per stream: the identity map's
    assert all(o.status == "paid" and o.version == 2 for o in orders)


async def test_get_many_raises_not_found_for_an_empty_stream(system):
    [known] = await place(system, 1)
    async with system.uow() as uow:
        with pytest.raises(NotFound):
            await uow.get_many(Order, [known, uuid.uuid4()])
