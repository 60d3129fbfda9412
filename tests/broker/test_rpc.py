"""Commands and queries across databases over NATS request-reply (app/broker/rpc.py): group A
(orders, payments, notifications on the session's database) sends to inventory hosted by group B
(its own database) with the same `mediator.send()`; errors come back as the same exceptions; a
call nobody answers, or one that arrives late, does not run; replicas in one queue group share
the calls; a bad message is refused and the responder keeps serving."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace

import msgspec
import nats
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from app import context, observe
from app.bootstrap import System, bootstrap
from app.broker.rpc import AUTH_HEADER, CORRELATION_HEADER, STATUS_HEADER, NatsTransport
from app.broker.server import server_command
from app.db import Database
from app.messages import DatabaseUnavailable, NotFound, Unavailable
from app.remote import DEADLINE_AT_HEADER, DEADLINE_HEADER
from app.settings import Settings
from modules.inventory.commands import (
    AddStock,
    InsufficientStock,
    InvalidStockRequest,
    ReserveStock,
    StockLine,
)
from modules.inventory.queries import GetStockLevel
from tests.scale.conftest import alive, call, free_port, order_body, wait_for

TOKEN = "rpc-test-token"
SUBJECT = "switchboard.rpc.inventory.ReserveStock"
CALLER_MODULES = ("orders", "payments", "notifications")

Connect = Callable[[], Awaitable[nats.NATS]]


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One `nats-server` for the module: request-reply needs no cluster (the queue group's test
    runs on the 3-node one as well)."""
    base = tmp_path_factory.mktemp("nats-rpc")
    port = free_port()
    with (base / "nats.log").open("w") as log:
        process = subprocess.Popen(server_command("127.0.0.1", port, base / "store"), stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while True:  # until it accepts connections
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"nats-server did not start:\n{(base / 'nats.log').read_text()}") from None
                time.sleep(0.05)  # a process starting: not a test's synchronisation
        yield f"nats://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)
        assert not alive(process.pid)


@pytest.fixture
async def connect(nats_url: str) -> AsyncIterator[Connect]:
    """NATS connections opened by a test; all closed at teardown."""
    opened: list[nats.NATS] = []

    async def open_one(url: str | list[str] = nats_url) -> nats.NATS:
        nc = await nats.connect(url, allow_reconnect=False)
        opened.append(nc)
        return nc

    yield open_one
    for nc in opened:
        await nc.close()


@pytest.fixture
async def systems() -> AsyncIterator[list[System]]:
    """Systems whose transports a test attached; all closed at teardown."""
    attached: list[System] = []
    yield attached
    for system in attached:
        await system.transport.close()


async def attached(systems: list[System], system: System, nc: nats.NATS) -> System:
    assert isinstance(system.transport, NatsTransport)
    await system.transport.start()
    await system.transport.attach(nc, system)
    systems.append(system)
    return system


@pytest.fixture
def settings_a(settings: Settings, nats_url: str) -> Settings:
    return replace(settings, modules=CALLER_MODULES, nats_url=nats_url, internal_token=TOKEN, instance_id="a")


@pytest.fixture
def settings_b(settings: Settings, nats_url: str, database_url_b: str) -> Settings:
    return replace(settings, database_url=database_url_b, modules=("inventory",), nats_url=nats_url,
                   internal_token=TOKEN, instance_id="b")  # fmt: skip


@pytest.fixture
async def caller(settings_a: Settings, db: Database, connect, systems) -> System:
    return await attached(systems, bootstrap(settings_a, db), await connect())


@pytest.fixture
async def callee(settings_b: Settings, clean_b: Database, connect, systems) -> System:
    system = await attached(systems, bootstrap(settings_b, clean_b), await connect())
    await system.mediator.send(AddStock(sku="widget", quantity=5))
    return system


def reserve(quantity: int, sku: str = "widget") -> ReserveStock:
    return ReserveStock(order_id=uuid.uuid4(), lines=(StockLine(sku=sku, quantity=quantity),))


async def level(system: System, sku: str = "widget") -> tuple[int, int]:
    view = await system.mediator.ask(GetStockLevel(sku=sku))
    return view.available, view.reserved


async def raw_request(nc: nats.NATS, body: bytes, headers: dict[str, str], subject: str = SUBJECT) -> tuple[int, dict]:
    reply = await nc.request(subject, body, timeout=5, headers=headers)
    return int(reply.headers[STATUS_HEADER]), msgspec.json.decode(reply.data)


def test_without_a_nats_url_bootstrap_keeps_the_http_transport(settings: Settings, db: Database, settings_a: Settings):
    from app.remote import RemoteTransport

    assert isinstance(bootstrap(replace(settings_a, nats_url=None), db).transport, RemoteTransport)
    assert isinstance(bootstrap(settings_a, db).transport, NatsTransport)


async def test_reserve_stock_sent_from_a_runs_on_b_database(caller, callee, db, clean_b):
    token = context.correlation_id.set("corr-rpc-1")
    try:
        assert await caller.mediator.send(reserve(2)) is None
    finally:
        context.correlation_id.reset(token)

    assert await level(caller) == (3, 2)  # asked across, too
    assert await level(callee) == (3, 2)
    assert await clean_b.fetchval("SELECT count(*) FROM inventory_reservations") == 1
    assert await db.fetchval("SELECT count(*) FROM inventory_reservations") == 0  # A holds no inventory rows
    assert await db.fetchval("SELECT count(*) FROM events") == 0
    # the callee's events carry the caller's correlation id
    reserved = await clean_b.fetchval("SELECT metadata->>'correlation_id' FROM events WHERE type = 'inventory.StockReserved'")
    assert reserved == "corr-rpc-1"


async def test_insufficient_stock_comes_back_as_insufficient_stock(caller, callee):
    with pytest.raises(InsufficientStock) as raised:
        await caller.mediator.send(reserve(6))

    assert raised.value.status_code == 409
    assert await level(callee) == (5, 0)


async def test_a_message_breaking_a_rule_is_refused_there_with_the_same_error(caller, callee, connect):
    nc = await connect()
    body = msgspec.json.encode({"order_id": str(uuid.uuid4()), "lines": []})

    reply = await nc.request(SUBJECT, body, timeout=5, headers={AUTH_HEADER: f"Bearer {TOKEN}"})

    assert (reply.headers[STATUS_HEADER], msgspec.json.decode(reply.data)["code"]) == ("400", "InvalidStockRequest")
    assert AUTH_HEADER not in reply.headers  # the token is not echoed back
    assert await level(callee) == (5, 0)
    with pytest.raises(InvalidStockRequest):  # and the caller raises what the HTTP edge would
        await caller.mediator.send(ReserveStock(order_id=uuid.uuid4(), lines=(StockLine(sku="w", quantity=1),) * 101))


async def test_with_no_responder_the_call_is_unavailable_at_once(caller):
    started = time.perf_counter()
    with pytest.raises(Unavailable) as raised:
        await caller.mediator.send(reserve(1))

    assert time.perf_counter() - started < caller.settings.default_timeout / 5
    assert raised.value.module == "inventory" and "answers" in raised.value.detail


async def test_no_responder_counts_against_inventory_breaker(settings_a, db, connect, systems):
    caller = await attached(systems, bootstrap(replace(settings_a, breaker_fail_max=2), db), await connect())
    for _ in range(2):
        with pytest.raises(Unavailable):
            await caller.mediator.send(reserve(1))

    with pytest.raises(Unavailable, match="circuit open"):
        await caller.mediator.send(reserve(1))


async def test_a_call_that_arrives_after_its_deadline_is_refused_without_running(callee, connect):
    nc = await connect()
    late = {AUTH_HEADER: f"Bearer {TOKEN}", DEADLINE_HEADER: "5.000", DEADLINE_AT_HEADER: f"{time.time() - 1:.3f}"}

    status, problem = await raw_request(nc, msgspec.json.encode(reserve(1)), late)

    assert (status, problem["code"]) == (503, Unavailable.__name__)
    assert "after its caller's deadline" in problem["detail"]
    assert await level(callee) == (5, 0)


async def test_the_callee_stops_when_the_caller_stops_waiting(settings_a, db, callee, connect, systems):
    caller = await attached(systems, bootstrap(replace(settings_a, default_timeout=0.3), db), await connect())
    started, stopped = asyncio.Event(), asyncio.Event()

    async def hangs(query):
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            stopped.set()

    callee.mediator.route(GetStockLevel).handler = hangs
    with pytest.raises(Unavailable):
        await caller.mediator.ask(GetStockLevel(sku="widget"))

    assert started.is_set()
    await asyncio.wait_for(stopped.wait(), 2.0)  # its deadline came from the caller


async def test_without_the_internal_token_nothing_runs(caller, callee, connect):
    nc = await connect()

    status, problem = await raw_request(nc, msgspec.json.encode(reserve(1)), {AUTH_HEADER: "Bearer wrong"})

    assert status == 401 and "internal token" in problem["title"]
    assert await level(callee) == (5, 0)


async def test_a_malformed_message_gets_a_400_problem_and_the_responder_keeps_serving(caller, callee, connect):
    nc = await connect()
    auth = {AUTH_HEADER: f"Bearer {TOKEN}"}

    for body in (b"{not json", b'{"order_id": 5, "lines": "x"}', b"[" * 100_000, b"\xff\xfe"):
        status, problem = await raw_request(nc, body, auth)
        assert (status, problem["title"]) == (400, "Invalid message"), body[:20]

    await caller.mediator.send(reserve(1))
    assert await level(callee) == (4, 1)


async def test_the_callee_span_continues_the_caller_trace(caller, callee):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    observe.use_tracer(provider)
    try:
        await caller.mediator.send(reserve(1))
    finally:
        observe.use_tracer(None)
        provider.shutdown()

    finished = exporter.get_finished_spans()
    by_id = {s.context.span_id: s for s in finished}

    def chain(span) -> list[str]:
        names = [span.name]
        while span.parent is not None:
            span = by_id[span.parent.span_id]
            names.append(span.name)
        return names

    responder = next(s for s in finished if s.kind == SpanKind.SERVER)
    callee_call = next(s for s in finished if s.name == "ReserveStock" and s.parent is not None and s.parent.span_id == responder.context.span_id)
    # the callee's mediator call, under its responder span, under the caller's client span and call
    assert chain(callee_call) == ["ReserveStock", f"rpc {SUBJECT}", f"rpc {SUBJECT}", "ReserveStock"]
    assert by_id[responder.parent.span_id].kind == SpanKind.CLIENT
    assert len({s.context.trace_id for s in finished}) == 1


async def test_the_responder_database_being_down_comes_back_as_database_unavailable(caller, callee):
    async def unreachable(query):
        raise ConnectionRefusedError("connection refused")

    callee.mediator.route(GetStockLevel).handler = unreachable

    with pytest.raises(DatabaseUnavailable):
        await caller.mediator.ask(GetStockLevel(sku="widget"))


async def test_an_unexpected_error_is_a_500_problem_and_the_responder_keeps_serving(caller, callee, connect):
    async def broken(query):
        raise RuntimeError("bug")

    route = callee.mediator.route(GetStockLevel)
    real, route.handler = route.handler, broken
    nc = await connect()

    status, problem = await raw_request(
        nc, b'{"sku": "widget"}', {AUTH_HEADER: f"Bearer {TOKEN}", CORRELATION_HEADER: "corr-500"},
        subject="switchboard.rpc.inventory.GetStockLevel",
    )  # fmt: skip

    assert (status, problem["title"], problem["request_id"]) == (500, "Internal error", "corr-500")
    route.handler = real
    assert await level(caller) == (5, 0)


async def test_a_slow_call_does_not_hold_up_the_calls_behind_it(caller, callee):
    route = callee.mediator.route(GetStockLevel)
    real, entered, released = route.handler, asyncio.Event(), asyncio.Event()

    async def slow_for_one(query):
        if query.sku == "slow":
            entered.set()
            await released.wait()
        return await real(query)

    route.handler = slow_for_one
    slow = asyncio.create_task(caller.mediator.ask(GetStockLevel(sku="slow")))
    await asyncio.wait_for(entered.wait(), 5.0)

    assert await level(caller) == (5, 0)  # answered while the slow one still runs
    assert not slow.done()
    released.set()
    with pytest.raises(NotFound):
        await slow


async def test_after_close_the_module_has_no_responder(caller, callee):
    await callee.transport.close()

    with pytest.raises(Unavailable, match="answers"):
        await caller.mediator.send(reserve(1))
    assert await level(callee) == (5, 0)


def counting(system: System) -> list[object]:
    """The messages `system` ran for a remote caller."""
    ran: list[object] = []
    real = system.mediator.dispatch_local

    async def dispatch_local(message, budget=None):
        ran.append(message)
        return await real(message, budget=budget)

    system.mediator.dispatch_local = dispatch_local  # type: ignore[method-assign]
    return ran


async def share_calls(caller: System, replicas: list[System], db_b: Database) -> None:
    ran = [counting(r) for r in replicas]

    async def every_replica_answers() -> bool:  # a cluster tells its nodes of a new responder a moment later
        await caller.mediator.ask(GetStockLevel(sku="widget"))
        return all(ran)

    await wait_for(every_replica_answers, 10.0, "an answer from every replica")
    for r in ran:
        r.clear()
    sent = [reserve(1) for _ in range(40)]

    await asyncio.gather(*(caller.mediator.send(m) for m in sent))

    assert all(ran), [len(r) for r in ran]  # each replica took some
    assert sorted(m.order_id for r in ran for m in r) == sorted(m.order_id for m in sent)  # each ran once
    assert await db_b.fetchval("SELECT count(*) FROM inventory_reservations") == 40


async def test_two_responders_in_one_queue_group_share_the_calls_and_each_runs_once(
    caller, callee, settings_b, clean_b, connect, systems
):
    await callee.mediator.send(AddStock(sku="widget", quantity=35))
    second = await attached(systems, bootstrap(replace(settings_b, instance_id="b2"), clean_b), await connect())

    await share_calls(caller, [callee, second], clean_b)


async def test_replicas_on_other_nodes_of_a_cluster_share_the_calls(
    nats_cluster, settings_a, settings_b, db, clean_b, connect, systems
):
    a, b = replace(settings_a, nats_url=nats_cluster.urls[0]), replace(settings_b, nats_url=nats_cluster.urls[1])
    caller = await attached(systems, bootstrap(a, db), await connect(nats_cluster.urls[0]))
    replicas = [
        await attached(systems, bootstrap(replace(b, instance_id=f"b{i}"), clean_b), await connect(nats_cluster.urls[i]))
        for i in (1, 2)
    ]
    await replicas[0].mediator.send(AddStock(sku="widget", quantity=40))

    await share_calls(caller, replicas, clean_b)


async def test_serve_processes_on_two_databases_reserve_across_nats(nats_url, cluster, db, clean_b, database_url_b):
    """Real `switchboard serve` groups: orders' ReserveStock on A crosses to inventory on B's
    database; InsufficientStock is A's 409; with B gone, A answers 503 at once."""
    broker = {"SWITCHBOARD_NATS_URL": nats_url}
    a = await cluster.start("a", modules=",".join(CALLER_MODULES), env=broker)
    b = await cluster.start("b", modules="inventory", env={**broker, "DATABASE_URL": database_url_b})
    stock = {"sku": "widget", "quantity": 3}
    assert (await call(cluster.http, "POST", f"{b.url}/inventory/items", json_body=stock))[0] == 201

    async def place(quantity: int, customer: str = "c-1") -> tuple[int, dict]:
        body = order_body("widget", quantity, "pm_card_ok", customer)
        status, _, answer = await call(cluster.http, "POST", f"{a.url}/orders", json_body=body)
        return status, answer

    for i in range(2):
        status, body = await place(1, f"c-{i}")
        assert status == 201, body
    status, problem = await place(5)
    assert (status, problem["code"]) == (409, "InsufficientStock"), problem

    async def paid() -> bool:  # the outcome travels back to B's inventory through JetStream
        level = (await call(cluster.http, "GET", f"{b.url}/inventory/items/widget"))[2]
        return (level["available"], level["reserved"]) == (1, 0)

    await wait_for(paid, 60.0, "both holds committed on B")
    assert await clean_b.fetchval("SELECT count(*) FROM inventory_reservations") == 2
    assert await db.fetchval("SELECT count(*) FROM inventory_reservations") == 0

    b.kill()
    started = time.perf_counter()
    status, problem = await place(1)
    assert status == 503 and problem["code"] == "Unavailable", problem
    assert time.perf_counter() - started < 2.0  # no responders: not a timeout
