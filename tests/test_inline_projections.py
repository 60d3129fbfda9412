"""Inline projections (Module.projections): a module's projection of its own events runs in the
transaction that appends them -- from a request's unit and from a relay delivery's, fast or
careful -- so its rows commit with the events, or not at all, and no delivery is needed."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from app.aggregate import Aggregate
from app.bootstrap import bootstrap
from app.messages import Event
from app.relay import Relay
from app.uow import UnitOfWork
from app.wiring import Module, Subscription
from modules.orders.events import OrderPlaced
from modules.orders.read_model import VIEW
from tests.app.relay_worker import SUBSCRIBER, TestEvent, append, deliver_everything
from tests.app.testing_contract.events import Counted
from tests.test_order_flow import drain_until, order_status, stocked_order

TABLE = "inline_test_projection"
COLUMNS = {"key": "text", "stream_id": "text"}


class Tally(Aggregate):
    stream_type = "tally"

    def count(self, key: str) -> None:
        self._record(Counted(key=key))

    def _apply(self, event: Event) -> None:
        pass


@pytest.fixture
async def projected_table(db) -> None:
    await db.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id bigserial PRIMARY KEY, key text NOT NULL, stream_id text)")
    await db.execute(f"TRUNCATE {TABLE} RESTART IDENTITY")


async def projected(db) -> list[str]:
    return [r["key"] for r in await db.fetch(f"SELECT key FROM {TABLE} ORDER BY id")]


def staging_projection(fail: Counter | None = None, times: int = 0):
    """Stages one row per Counted; with `fail`, raises for the first `times` calls per key."""

    async def project(event: Counted, uow: UnitOfWork) -> None:
        if fail is not None:
            fail[event.key] += 1
            if fail[event.key] <= times:
                raise RuntimeError(f"projection of {event.key} failed")
        uow.stage(TABLE, COLUMNS, [(event.key, None)])

    return project


def system_with(settings, db, projection, subscriptions=None):
    module = Module(
        name="testing",
        package="tests.app.testing_contract",
        projections={Counted: projection},
        subscriptions={TestEvent: subscriptions or []},
    )
    return bootstrap(replace(settings, modules=None), db, modules=[module])


async def count_once(event: TestEvent, uow: UnitOfWork) -> None:
    """A subscriber that records a Counted on one shared stream per delivery."""
    async with uow:
        tally = await uow.find(Tally, "all") or Tally("all")
        tally.count(event.key)
        uow.add(tally)
        await uow.commit()


async def counted_events(db) -> list[str]:
    return [r["key"] for r in await db.fetch("SELECT data->>'key' AS key FROM events WHERE type = 'testing.Counted' ORDER BY position")]


# -- the kernel ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("projected_table")
async def test_a_units_commit_writes_the_staged_projection_rows_with_its_events_in_order(db, settings):
    system = system_with(settings, db, staging_projection())

    uow = system.uow()
    async with uow:
        tally = Tally("a")
        tally.count("first")
        tally.count("second")
        uow.add(tally)
        await uow.commit()

    assert await projected(db) == ["first", "second"]
    assert await counted_events(db) == ["first", "second"]
    assert await db.fetchval("SELECT count(*) FROM outbox") == 0  # nothing to deliver


@pytest.mark.usefixtures("projected_table")
async def test_a_projection_writing_through_the_transaction_commits_with_the_events(db, settings):
    async def write(event: Counted, uow: UnitOfWork) -> None:
        conn = await uow.transaction()
        stream = await conn.fetchval("SELECT max(stream_id) FROM events")  # the event is not appended yet
        await conn.execute(f"INSERT INTO {TABLE} (key, stream_id) VALUES ($1, $2)", event.key, stream)

    system = system_with(settings, db, write)
    uow = system.uow()
    async with uow:
        tally = Tally("b")
        tally.count("one")
        uow.add(tally)
        await uow.commit()

    assert await db.fetch(f"SELECT key, stream_id FROM {TABLE}") == [("one", None)]
    assert await counted_events(db) == ["one"]


@pytest.mark.usefixtures("projected_table")
async def test_a_failing_projection_fails_the_commit_and_writes_nothing(db, settings):
    async def fail_after_writing(event: Counted, uow: UnitOfWork) -> None:
        conn = await uow.transaction()
        await conn.execute(f"INSERT INTO {TABLE} (key) VALUES ($1)", event.key)
        raise RuntimeError("the projection failed")

    system = system_with(settings, db, fail_after_writing)
    uow = system.uow()
    with pytest.raises(RuntimeError, match="the projection failed"):
        async with uow:
            tally = Tally("c")
            tally.count("lost")
            uow.add(tally)
            await uow.commit()

    assert await projected(db) == []
    assert await counted_events(db) == []


@pytest.mark.usefixtures("projected_table")
async def test_a_fast_run_projects_each_deliverys_new_events_once(db, settings, monkeypatch):
    import app.relay

    monkeypatch.setattr(app.relay, "RUN_HOLD_SECONDS", 60.0)  # one run: all eight share one tally
    system = system_with(settings, db, staging_projection(), [Subscription(SUBSCRIBER, count_once)])
    relay = Relay(system, instance_id="relay-test")
    keys = await append(system, 8, 1)

    assert await relay.run_once() == 8

    assert sorted(await projected(db)) == sorted(keys)  # each event once, though each delivery saw all earlier ones pending
    assert await projected(db) == await counted_events(db)


@pytest.mark.usefixtures("projected_table")
async def test_a_delivery_whose_projection_fails_once_is_retried_and_applied_once(db, settings):
    settings = replace(settings, retry_base_seconds=0.001, retry_cap_seconds=0.001)
    calls: Counter = Counter()
    system = system_with(settings, db, staging_projection(calls, times=1), [Subscription(SUBSCRIBER, count_once)])
    relay = Relay(system, instance_id="relay-test")
    keys = await append(system, 3, 1)

    await deliver_everything(relay)

    assert sorted(await projected(db)) == sorted(keys)
    assert sorted(await counted_events(db)) == sorted(keys)  # no event appended without its projection
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 0


@pytest.mark.usefixtures("projected_table")
async def test_a_delivery_whose_projection_keeps_failing_is_dead_lettered_with_nothing_appended(db, settings):
    settings = replace(settings, retry_base_seconds=0.001, retry_cap_seconds=0.001, retry_max_attempts=3)
    calls: Counter = Counter()
    system = system_with(settings, db, staging_projection(calls, times=1000), [Subscription(SUBSCRIBER, count_once)])
    relay = Relay(system, instance_id="relay-test")
    [key] = await append(system, 1, 1)

    await deliver_everything(relay)

    [letter] = await db.fetch("SELECT subscriber, error_message, attempts FROM dead_letters")
    assert letter["subscriber"] == SUBSCRIBER and letter["attempts"] == 3
    assert f"projection of {key} failed" in letter["error_message"]
    assert await projected(db) == [] and await counted_events(db) == []


def test_bootstrap_refuses_an_inline_projection_of_another_modules_event(settings, db):
    module = Module(name="testing", package="tests.app.testing_contract", projections={OrderPlaced: staging_projection()})

    with pytest.raises(ValueError, match=r"module 'testing' projects OrderPlaced inline, but that is not its own event"):
        bootstrap(replace(settings, modules=None), db, modules=[module])


# -- orders_view ---------------------------------------------------------------------------------


async def test_a_paid_order_reads_paid_and_its_view_cost_no_delivery(client, app_relay, db):
    placed = await stocked_order(client, "pm_card_ok")
    assert await order_status(client, placed["order_id"]) == "placed"  # at commit, no relay ran

    await drain_until(app_relay, lambda: _status_is(client, placed["order_id"], "paid"))

    assert await db.fetchval("SELECT count(*) FROM outbox WHERE subscriber = $1", VIEW) == 0
    assert await db.fetchval("SELECT version FROM orders_view") == 2


async def _status_is(client, order_id: str, status: str) -> bool:
    return await order_status(client, order_id) == status


async def _as_before_the_upgrade(db, order_id: str) -> None:
    """The state an older version left: the order's OrderPlaced appended, its view row not yet
    written but waiting in the outbox for the view's subscription."""
    await db.execute("DELETE FROM orders_view WHERE order_id = $1", order_id)
    await db.execute(
        "INSERT INTO outbox (message_id, position, subscriber, type, partition_key, payload, headers)"
        " SELECT message_id, position, $1, type, partition_key, payload, headers FROM outbox"
        " WHERE subscriber = 'payments.charge_order' AND type = 'orders.OrderPlaced'",
        VIEW,
    )


@pytest.mark.outbox_retention(3600)  # reads delivered rows
async def test_a_view_row_left_in_the_outbox_before_the_upgrade_is_still_delivered(client, app_relay, db):
    placed = await stocked_order(client, "pm_card_ok")
    await _as_before_the_upgrade(db, placed["order_id"])
    assert await order_status(client, placed["order_id"]) is None

    await drain_until(app_relay, lambda: _status_is(client, placed["order_id"], "paid"))

    assert await db.fetchval("SELECT status FROM outbox WHERE subscriber = $1", VIEW) == "delivered"
    assert (await client.get(f"/orders/{placed['order_id']}")).json()["items"] == [{"sku": "widget", "quantity": 2}]


@pytest.mark.outbox_retention(3600)  # reads delivered rows
async def test_an_order_paid_before_its_old_view_row_is_delivered_still_ends_paid(client, app_relay, db):
    placed = await stocked_order(client, "pm_card_ok")
    await _as_before_the_upgrade(db, placed["order_id"])
    await db.execute("UPDATE outbox SET available_at = now() + interval '1 hour' WHERE subscriber = $1", VIEW)

    await drain_until(app_relay, lambda: _status_is(client, placed["order_id"], "paid"))  # written from the stream
    await db.execute("UPDATE outbox SET available_at = now() WHERE subscriber = $1", VIEW)
    await drain_until(app_relay, lambda: _delivered(db))

    response = await client.get(f"/orders/{placed['order_id']}")
    assert response.json()["status"] == "paid"  # the late OrderPlaced did not put it back to placed
    assert response.json()["items"] == [{"sku": "widget", "quantity": 2}]
    assert response.json()["customer_id"] == "c-1"


async def _delivered(db) -> bool:
    return await db.fetchval("SELECT status FROM outbox WHERE subscriber = $1", VIEW) == "delivered"


# -- the baseline app does the same work -----------------------------------------------------------


async def test_the_baseline_app_writes_the_same_view_row_and_outbox_rows_as_switchboard(client, db, database_url, monkeypatch):
    import httpx

    from bench import baseline

    monkeypatch.setenv("DATABASE_URL", database_url)
    theirs = await stocked_order(client, "pm_card_ok")
    app = baseline.create_app()
    async with app.lifespan(), httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://b") as http:
        response = await http.post(
            "/orders", json={"customer_id": "c-1", "items": [{"sku": "widget", "quantity": 2}], "payment_method": "pm_card_ok"}
        )
        assert response.status_code == 201, response.text
    ours = response.json()

    views = {
        str(r["order_id"]): (r["customer_id"], r["status"], r["items"], r["payment_method"], r["version"])
        for r in await db.fetch("SELECT * FROM orders_view")
    }
    assert views[ours["order_id"]] == views[theirs["order_id"]]
    subscribers = await db.fetch(
        "SELECT partition_key, array_agg(subscriber ORDER BY subscriber) AS s FROM outbox WHERE type = 'orders.OrderPlaced' GROUP BY 1"
    )
    assert {r["partition_key"]: r["s"] for r in subscribers} == {
        f"order-{ours['order_id']}": ["payments.charge_order"],
        f"order-{theirs['order_id']}": ["payments.charge_order"],
    }


# -- switchboard describe --------------------------------------------------------------------------


def test_describe_lists_orders_inline_projections_and_its_retired_subscription():
    from app.cli.describe import describe, render
    from app.settings import Settings

    wiring = describe(Settings(instance_id="describe-test"))

    assert {(p["event"], p["module"], p["handler"]) for p in wiring["projections"]} == {
        (topic, "orders", "modules.orders.read_model.project_order_view")
        for topic in ("orders.OrderPlaced", "orders.OrderPaid", "orders.OrderPaymentDeclined", "orders.OrderPaymentFailed")
    }
    view = next(s for s in wiring["subscriptions"] if s["name"] == VIEW)
    assert view["retired"] is True and view["events"] == [] and view["handler"] == "modules.orders.read_model.drain_order_view"
    assert [s["name"] for s in wiring["subscriptions"] if s["retired"]] == [VIEW]
    text = render(wiring)
    assert "inline projections" in text and "(retired: old rows only)" in text


def test_describe_refuses_a_foreign_inline_projection_in_one_line(monkeypatch, capsys):
    import argparse

    from app.cli.describe import cmd_describe
    from modules.payments.module import module as payments

    monkeypatch.setattr(payments, "projections", {OrderPlaced: staging_projection()})

    assert cmd_describe(argparse.Namespace(modules=None, json=False)) == 2

    assert capsys.readouterr().err.strip().splitlines() == [
        "switchboard: module 'payments' projects OrderPlaced inline, but that is not its own event: "
        "subscribe to it instead (Module(subscriptions=...))"
    ]


async def test_an_order_placed_and_paid_in_one_commit_reads_paid(system, db):
    """OrderPlaced's view row is staged; OrderPaid's projection updates it in the same commit, so
    it must see the staged row (written before its SQL, not at the append)."""
    from uuid import uuid4

    from modules.orders.aggregate import Order

    order_id = uuid4()
    async with system.uow() as uow:
        order = Order.place(order_id, "cust-1", [("sku-1", 2)], "pm_card_ok")
        order.mark_paid()
        uow.add(order)
        await uow.commit()

    assert await db.fetchrow("SELECT status, version FROM orders_view WHERE order_id = $1", order_id) == ("paid", 2)
