"""The event store and outbox on real PostgreSQL: optimistic concurrency, atomic units, one outbox
row per (event, subscriber), metadata, and the NOTIFY that wakes relays on commit."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from uuid import UUID

import asyncpg
import msgspec
import pytest

from app import context
from app.bootstrap import System
from app.db import OUTBOX_CHANNEL, Database
from app.mediator import Mediator
from app.messages import Command, ConcurrencyError
from modules.inventory.aggregate import Stock
from modules.orders.aggregate import Order
from modules.orders.events import OrderPaid, OrderPlaced
from modules.payments.aggregate import Payment
from modules.payments.events import PaymentCaptured

WAIT = 5.0


async def place_order(system: System, order_id: UUID | None = None) -> UUID:
    order_id = order_id or uuid.uuid4()
    async with system.uow() as uow:
        uow.add(Order.place(order_id, "cust-1", [("sku-1", 2)], "pm_card_ok"))
        await uow.commit()
    return order_id


async def add_stock(system: System, sku: str, quantity: int) -> None:
    async with system.uow() as uow:
        stock = await uow.find(Stock, sku) or Stock(sku)
        stock.add(quantity)
        uow.add(stock)
        await uow.commit()


async def count(db: Database, table: str) -> int:
    return await db.fetchval(f"SELECT count(*) FROM {table}")  # table names are this file's constants


async def stream(db: Database, stream_id: str) -> list[tuple[int, str]]:
    rows = await db.fetch("SELECT version, type FROM events WHERE stream_id = $1 ORDER BY version", stream_id)
    return [(r["version"], r["type"]) for r in rows]


@contextlib.contextmanager
def correlated(correlation_id: str, causation_id: str) -> Iterator[None]:
    tokens = context.correlation_id.set(correlation_id), context.causation_id.set(causation_id)
    try:
        yield
    finally:
        context.correlation_id.reset(tokens[0])
        context.causation_id.reset(tokens[1])


@pytest.fixture
async def notifications(db: Database) -> AsyncIterator[asyncio.Queue[str]]:
    """Payloads NOTIFYed on the outbox channel, seen by a connection of its own, in commit order."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(db.url)
    await listener.add_listener(
        OUTBOX_CHANNEL, lambda _conn, _pid, _channel, payload: queue.put_nowait(payload)
    )
    try:
        yield queue
    finally:
        await listener.close()


async def received_before_marker(db: Database, queue: asyncio.Queue[str]) -> list[str]:
    """Everything NOTIFYed so far: PostgreSQL delivers notifications in commit order, so once a
    marker sent now arrives, every earlier committed notification has arrived before it. Relays
    in other processes are woken by one coalesced NOTIFY sent just after commits: wait for it."""
    await db.notified()
    await db.execute(f"NOTIFY {OUTBOX_CHANNEL}, 'marker'")
    seen = []
    while (payload := await asyncio.wait_for(queue.get(), WAIT)) != "marker":
        seen.append(payload)
    return seen


# --- optimistic concurrency -----------------------------------------------------------------


async def test_the_second_of_two_units_deciding_on_the_same_version_raises_concurrency_error(system):
    order_id = await place_order(system)
    first, second = system.uow(), system.uow()
    async with first, second:
        paying = await first.get(Order, order_id)
        declining = await second.get(Order, order_id)
        paying.mark_paid()
        declining.mark_payment_declined("card declined")
        await first.commit()

        with pytest.raises(ConcurrencyError):
            await second.commit()


async def test_a_unit_that_lost_a_concurrency_race_stores_no_events_and_no_outbox_rows(system, db):
    order_id = await place_order(system)
    first, second = system.uow(), system.uow()
    async with first, second:
        (await first.get(Order, order_id)).mark_paid()
        (await second.get(Order, order_id)).mark_payment_declined("card declined")
        await first.commit()
        with pytest.raises(ConcurrencyError):
            await second.commit()

    assert await stream(db, f"order-{order_id}") == [(1, "orders.OrderPlaced"), (2, "orders.OrderPaid")]
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE type = 'orders.OrderPaymentDeclined'") == 0


async def test_a_conflict_also_discards_the_units_module_table_writes(system, db):
    order_id = await place_order(system)
    first, second = system.uow(), system.uow()
    async with first, second:
        (await first.get(Order, order_id)).mark_paid()
        (await second.get(Order, order_id)).mark_payment_declined("card declined")
        conn = await second.transaction()
        await conn.execute(
            "INSERT INTO inventory_reservations (order_id, sku, quantity) VALUES ($1, 'sku-1', 2)", order_id
        )
        await first.commit()
        with pytest.raises(ConcurrencyError):
            await second.commit()

    assert await count(db, "inventory_reservations") == 0


class Restock(Command):
    sku: str
    quantity: int


def restocking_mediator(system: System, rival_attempts: int, **options) -> tuple[Mediator, list[int]]:
    """Restock through a Mediator; on its first `rival_attempts` attempts another writer adds 5
    units to the same stream between the handler's load and its commit."""
    attempts: list[int] = []

    async def restock(cmd: Restock) -> None:
        attempts.append(len(attempts) + 1)
        async with system.uow() as uow:
            stock = await uow.get(Stock, cmd.sku)
            stock.add(cmd.quantity)
            if len(attempts) <= rival_attempts:
                await add_stock(system, cmd.sku, 5)
            await uow.commit()

    return Mediator({Restock: ("inventory", restock)}, **options), attempts


async def test_the_mediator_reruns_a_command_that_lost_a_concurrency_race_and_it_succeeds(system):
    await add_stock(system, "sku-1", 10)
    mediator, attempts = restocking_mediator(system, rival_attempts=1)

    await mediator.send(Restock(sku="sku-1", quantity=3))

    assert attempts == [1, 2]
    async with system.uow() as uow:
        assert (await uow.get(Stock, "sku-1")).available == 10 + 5 + 3


async def test_the_mediator_gives_up_after_its_conflict_retries_with_concurrency_error(system, db):
    await add_stock(system, "sku-1", 10)
    mediator, attempts = restocking_mediator(system, rival_attempts=100, conflict_retries=2)

    with pytest.raises(ConcurrencyError):
        await mediator.send(Restock(sku="sku-1", quantity=3))

    assert attempts == [1, 2, 3]
    assert await db.fetchval("SELECT count(*) FROM events WHERE data->>'quantity' = '3'") == 0


async def test_two_units_deadlocked_on_each_others_streams_end_in_one_concurrency_error(system):
    await add_stock(system, "sku-a", 1)
    await add_stock(system, "sku-b", 1)
    appended = {"sku-a": asyncio.Event(), "sku-b": asyncio.Event()}

    async def unit(first: str, second: str, quick_to_detect: bool) -> None:
        uow = system.uow()
        async with uow:
            async with uow:  # nested, as the relay runs a subscriber: each commit appends, none ends it
                conn = await uow.transaction()
                if quick_to_detect:  # keep the test fast; which unit detects the deadlock does not matter
                    await conn.execute("SET LOCAL deadlock_timeout = '50ms'")
                one, two = await uow.get(Stock, first), await uow.get(Stock, second)
                one.add(1)
                await uow.commit()  # holds version 2 of `first`
                appended[first].set()
                await appended[second].wait()
                two.add(1)
                await uow.commit()  # waits for the other unit, which waits for this one
            await uow.commit()

    outcomes = await asyncio.wait_for(
        asyncio.gather(unit("sku-a", "sku-b", False), unit("sku-b", "sku-a", True), return_exceptions=True),
        WAIT,
    )

    assert sorted(type(o).__name__ for o in outcomes) == ["ConcurrencyError", "NoneType"], outcomes


# --- atomicity ------------------------------------------------------------------------------


async def test_a_handler_that_raises_after_recording_events_and_writing_a_module_table_leaves_nothing(
    system, db
):
    order_id = uuid.uuid4()

    with pytest.raises(RuntimeError):
        async with system.uow() as uow:
            uow.add(Order.place(order_id, "cust-1", [("sku-1", 2)], "pm_card_ok"))
            conn = await uow.transaction()
            await conn.execute(
                "INSERT INTO inventory_reservations (order_id, sku, quantity) VALUES ($1, 'sku-1', 2)",
                order_id,
            )
            raise RuntimeError("the handler has a bug")

    assert (
        await count(db, "events"),
        await count(db, "outbox"),
        await count(db, "inventory_reservations"),
    ) == (0, 0, 0)


async def test_module_table_writes_through_transaction_commit_together_with_the_events(system, db):
    order_id = uuid.uuid4()

    async with system.uow() as uow:
        uow.add(Order.place(order_id, "cust-1", [("sku-1", 2)], "pm_card_ok"))
        conn = await uow.transaction()
        await conn.execute(
            "INSERT INTO inventory_reservations (order_id, sku, quantity) VALUES ($1, 'sku-1', 2)", order_id
        )
        await uow.commit()

    assert (await count(db, "events"), await count(db, "inventory_reservations")) == (1, 1)


async def test_a_nested_unit_commits_only_when_the_outermost_unit_commits(system, db):
    uow = system.uow()
    async with uow:
        async with uow:
            uow.add(Order.place(uuid.uuid4(), "cust-1", [("sku-1", 2)], "pm_card_ok"))
            await uow.commit()
        assert await count(db, "events") == 0  # appended inside the open transaction, not visible yet

        await uow.commit()

    assert await count(db, "events") == 1


async def test_a_nested_units_commit_is_rolled_back_when_the_outer_unit_raises(system, db):
    uow = system.uow()
    with pytest.raises(RuntimeError):
        async with uow:
            async with uow:
                uow.add(Order.place(uuid.uuid4(), "cust-1", [("sku-1", 2)], "pm_card_ok"))
                await uow.commit()
            raise RuntimeError("the relay's inbox write failed")

    assert (await count(db, "events"), await count(db, "outbox")) == (0, 0)


async def test_appending_several_aggregates_in_one_unit_stores_all_their_events(system, db):
    order_id = uuid.uuid4()

    async with system.uow() as uow:
        uow.add(Order.place(order_id, "cust-1", [("sku-1", 2)], "pm_card_ok"))
        stock = Stock("sku-1")
        stock.add(7)
        uow.add(stock)
        await uow.commit()

    assert await stream(db, f"order-{order_id}") == [(1, "orders.OrderPlaced")]
    assert await stream(db, "stock-sku-1") == [(1, "inventory.StockAdded")]
    assert sorted(uow.positions) == [
        r["position"] for r in await db.fetch("SELECT position FROM events ORDER BY 1")
    ]


async def test_a_unit_appends_its_streams_in_stream_id_order_whatever_order_it_loaded_them(system, db):
    await add_stock(system, "sku-b", 1)
    await add_stock(system, "sku-a", 1)

    async with system.uow() as uow:
        for sku in ("sku-b", "sku-a"):
            (await uow.get(Stock, sku)).add(1)
        await uow.commit()

    rows = await db.fetch("SELECT stream_id FROM events WHERE version = 2 ORDER BY position")
    assert [r["stream_id"] for r in rows] == ["stock-sku-a", "stock-sku-b"]  # one lock order: no deadlock


async def test_appending_several_aggregates_is_atomic_when_one_of_them_conflicts(system, db):
    await add_stock(system, "sku-1", 10)
    order_id = uuid.uuid4()

    with pytest.raises(ConcurrencyError):
        async with system.uow() as uow:
            stock = await uow.get(Stock, "sku-1")
            stock.reserve(order_id, 2)
            uow.add(Order.place(order_id, "cust-1", [("sku-1", 2)], "pm_card_ok"))
            await add_stock(system, "sku-1", 1)  # another writer moves the stock stream on
            await uow.commit()

    assert await stream(db, f"order-{order_id}") == []
    assert await stream(db, "stock-sku-1") == [(1, "inventory.StockAdded"), (2, "inventory.StockAdded")]
    assert await count(db, "outbox") == 0


# --- outbox rows and metadata ---------------------------------------------------------------


async def test_commit_writes_one_outbox_row_per_subscriber_of_each_event(system, db):
    # OrderPaid has no subscriber (orders_view projects it inline): it writes no outbox row
    order_id = uuid.uuid4()
    async with system.uow() as uow:
        order = Order.place(order_id, "cust-1", [("sku-1", 2)], "pm_card_ok")
        order.mark_paid()
        uow.add(order)
        payment = Payment(order_id)
        payment.capture("pm_card_ok", "ref-1")
        uow.add(payment)
        await uow.commit()

    rows = await db.fetch("SELECT type, subscriber FROM outbox ORDER BY id")
    expected = {
        (event.topic(), name)
        for event in (OrderPlaced, OrderPaid, PaymentCaptured)
        for name in system.catalog.subscribers.get(event, ())
    }
    assert len(system.catalog.subscribers[PaymentCaptured]) >= 2
    assert len(rows) == len(expected)
    assert {(r["type"], r["subscriber"]) for r in rows} == expected


async def test_a_units_positions_are_the_stored_positions_of_its_events_one_or_several(system, db):
    # one event goes through the plain-parameter statement, several through the array one
    async with system.uow() as uow:
        uow.add(Order.place(uuid.uuid4(), "cust-1", [("sku-1", 2)], "pm_card_ok"))
        await uow.commit()
    one = list(uow.positions)
    async with system.uow() as uow:
        order = Order.place(uuid.uuid4(), "cust-2", [("sku-1", 1)], "pm_card_ok")
        order.mark_paid()
        uow.add(order)
        await uow.commit()
    several = list(uow.positions)

    stored = [r["position"] for r in await db.fetch("SELECT position FROM events ORDER BY position")]
    assert (len(one), len(several)) == (1, 2)
    assert one + several == stored
    by_position = await db.fetch("SELECT position, count(*) AS n FROM outbox GROUP BY position ORDER BY position")
    assert OrderPaid not in system.catalog.subscribers  # projected inline: no outbox row at stored[2]
    assert [(r["position"], r["n"]) for r in by_position] == [
        (stored[0], len(system.catalog.subscribers[OrderPlaced])),
        (stored[1], len(system.catalog.subscribers[OrderPlaced])),
    ]


async def test_each_outbox_row_carries_its_events_id_position_stream_and_payload(system, db):
    order_id = await place_order(system)

    event = await db.fetchrow("SELECT event_id, position, stream_id, data FROM events")
    rows = await db.fetch("SELECT message_id, position, partition_key, payload, status FROM outbox")
    assert len(rows) == len(system.catalog.subscribers[OrderPlaced])
    for row in rows:
        assert (row["message_id"], row["position"], row["partition_key"]) == (
            event["event_id"],
            event["position"],
            f"order-{order_id}",
        )
        assert json.loads(row["payload"]) == json.loads(event["data"])
        assert row["status"] == "pending"


async def test_the_stored_payload_is_the_events_json_and_decodes_back_to_the_event(system, db):
    order_id = uuid.uuid4()
    order = Order.place(order_id, "cust-1", [("sku-1", 2)], "pm_card_ok")
    (expected,) = order.pending_events
    async with system.uow() as uow:
        uow.add(order)
        await uow.commit()

    payload = await db.fetchval("SELECT payload FROM outbox LIMIT 1")

    assert json.loads(payload) == json.loads(msgspec.json.encode(expected))
    assert system.catalog.decode("orders.OrderPlaced", payload) == expected


async def test_an_event_no_one_subscribes_to_is_stored_without_outbox_rows(system, db):
    await add_stock(system, "sku-1", 10)  # StockAdded: published, not subscribed

    assert (await count(db, "events"), await count(db, "outbox")) == (1, 0)


async def test_event_metadata_carries_the_correlation_and_causation_ids_of_the_work(system, db):
    with correlated("corr-42", "cause-7"):
        await place_order(system)

    metadata = json.loads(await db.fetchval("SELECT metadata FROM events"))

    assert (metadata["correlation_id"], metadata["causation_id"]) == ("corr-42", "cause-7")


async def test_outbox_headers_carry_the_correlation_id_to_every_subscriber(system, db):
    with correlated("corr-42", "cause-7"):
        await place_order(system)

    headers = [json.loads(h) for (h,) in await db.fetch("SELECT headers FROM outbox")]

    assert len(headers) == len(system.catalog.subscribers[OrderPlaced])
    assert {(h["correlation_id"], h["causation_id"]) for h in headers} == {("corr-42", "cause-7")}


# --- NOTIFY on commit -----------------------------------------------------------------------


async def test_a_commit_with_outbox_rows_notifies_the_outbox_channel(system, notifications):
    await place_order(system)

    assert await asyncio.wait_for(notifications.get(), WAIT) == ""


async def test_the_notification_is_sent_when_the_outermost_unit_commits_not_when_events_are_appended(
    system, db, notifications
):
    uow = system.uow()
    async with uow:
        async with uow:
            uow.add(Order.place(uuid.uuid4(), "cust-1", [("sku-1", 2)], "pm_card_ok"))
            await uow.commit()
        assert await received_before_marker(db, notifications) == []

        await uow.commit()

    assert await received_before_marker(db, notifications) == [""]


async def test_a_rolled_back_unit_publishes_nothing(system, db, notifications):
    uow = system.uow()
    with pytest.raises(RuntimeError):
        async with uow:
            async with uow:
                uow.add(Order.place(uuid.uuid4(), "cust-1", [("sku-1", 2)], "pm_card_ok"))
                await uow.commit()
            raise RuntimeError("rolled back")

    assert await received_before_marker(db, notifications) == []


async def test_relays_in_this_process_are_woken_when_the_outermost_unit_commits(system, db):
    woken: list[str] = []
    unsubscribe = db.on_outbox_written(lambda: woken.append("woken"))
    try:
        uow = system.uow()
        async with uow:
            async with uow:
                uow.add(Order.place(uuid.uuid4(), "cust-1", [("sku-1", 2)], "pm_card_ok"))
                await uow.commit()
            assert woken == []

            await uow.commit()

        assert woken == ["woken"]
    finally:
        unsubscribe()
