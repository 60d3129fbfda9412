"""The baseline: a hand-written litestar + asyncpg `POST /orders` with the same synchronous SQL
work as switchboard's, and nothing else — no mediator, no unit of work, no ORM, no middleware.

Per request, on the switchboard schema (tables from `switchboard migrate`):
1. read each SKU's stock stream (`SELECT type, data FROM events WHERE stream_id = ANY(..)`) and
   fold it into the available quantity (StockAdded +, StockReserved −, ReservationReleased +);
2. one statement, its own transaction: append `inventory.StockReserved` at the expected version
   (the unique (stream_id, version) constraint is the optimistic lock; a conflict re-reads and
   decides again, up to 30 times with the same jittered pause as switchboard's mediator) and
   insert the `inventory_reservations` rows;
3. one statement, its own transaction: append `orders.OrderPlaced` with one outbox row per
   subscriber of OrderPlaced and the order's `orders_view` row (switchboard projects it inline,
   in the same statement); after the commit, a relay elsewhere is woken by one coalesced
   `pg_notify` per 2 ms, as switchboard does;
4. answer 201 with the same JSON fields, `Location` and `X-Switchboard-Position`.

Two commits per order, like switchboard (reservation, then order), and three round trips, like
switchboard (read; append + holds in one statement; append + outbox rows).
No relay runs here: the outbox rows stay pending (switchboard delivers its own).

Serve: `python -m bench.baseline --port 8100` (granian with the same options as `switchboard serve`:
bench/serve.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated

import asyncpg
import msgspec
from litestar import Litestar, Response, get, post
from litestar.params import JSONBody

# Outbox subscribers of orders.OrderPlaced in the example modules (the harness checks this list
# against switchboard's event catalog before it runs, so a new subscription cannot go unnoticed).
ORDER_PLACED_SUBSCRIBERS = ("payments.charge_order",)
OUTBOX_CHANNEL = "switchboard_outbox"
CONFLICT_RETRIES = 30
POOL_SIZE = int(os.environ.get("SWITCHBOARD_DB_POOL_SIZE", "20"))  # switchboard's default pool

Text = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[^\x00]*$")]


class LineRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    sku: Text
    quantity: Annotated[int, msgspec.Meta(gt=0, le=1_000_000)]


class PlaceOrderRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    customer_id: Text
    items: Annotated[list[LineRequest], msgspec.Meta(min_length=1, max_length=100)]
    payment_method: Text


class Line(msgspec.Struct, frozen=True):
    sku: str
    quantity: int


class OrderPlacedResponse(msgspec.Struct, frozen=True, kw_only=True):
    order_id: uuid.UUID
    status: str
    customer_id: str
    items: list[Line]
    payment_method: str
    position: int
    placed_at: datetime


READ_SQL = (
    "SELECT stream_id, type, data FROM events WHERE stream_id = ANY($1::text[]) ORDER BY stream_id, version"
)

RESERVE_SQL = """
WITH ev AS (
    INSERT INTO events (event_id, stream_id, version, type, data, metadata)
    SELECT gen_random_uuid(), s, v, 'inventory.StockReserved', d, $4::jsonb
    FROM unnest($1::text[], $2::int[], $3::jsonb[]) AS e(s, v, d)
    RETURNING 1
)
INSERT INTO inventory_reservations (order_id, sku, quantity)
SELECT $5::uuid, sku, qty FROM unnest($6::text[], $7::int[]) AS r(sku, qty)
ON CONFLICT DO NOTHING
"""

PLACE_SQL = """
WITH ev AS (
    INSERT INTO events (event_id, stream_id, version, type, data, metadata)
    VALUES ($1, $2, 1, 'orders.OrderPlaced', $3::jsonb, $4::jsonb)
    RETURNING position, event_id, stream_id, type, data, metadata
), ob AS (
    INSERT INTO outbox (message_id, position, subscriber, type, partition_key, payload, headers)
    SELECT ev.event_id, ev.position, s.subscriber, ev.type, ev.stream_id, ev.data, ev.metadata
    FROM ev CROSS JOIN unnest($5::text[]) AS s(subscriber)
    RETURNING 1
), vw AS (
    INSERT INTO orders_view (order_id, customer_id, status, items, payment_method, version, placed_at)
    VALUES ($6, $7, 'placed', $8::jsonb, $9, 1, $10)
    ON CONFLICT DO NOTHING
)
SELECT ev.position, (SELECT count(*) FROM ob)
FROM ev
"""
# Like switchboard: a relay elsewhere is woken by one NOTIFY per interval sent after the commits
# it covers, not by a NOTIFY in every transaction (that takes a database-wide lock held through
# the commit's flush: see NOTIFY cost in BENCHMARKS.md).
NOTIFY_INTERVAL = 0.002


class _Notifier:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool, self.dirty, self.task = pool, False, None

    def written(self) -> None:
        self.dirty = True
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        while self.dirty:
            await asyncio.sleep(NOTIFY_INTERVAL)
            self.dirty = False
            await self.pool.execute("SELECT pg_notify($1, '')", OUTBOX_CHANNEL)


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Like switchboard's pool: nothing sets session state, so skip asyncpg's RESET ALL round trip
    on every release (asyncpg rolls back an open transaction itself)."""


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class Rejected(Exception):
    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail


def _available(events: list) -> int:
    available = 0
    for row in events:
        kind = row["type"]
        if kind == "inventory.StockAdded":
            available += _decode(row["data"])["quantity"]
        elif kind == "inventory.StockReserved":
            available -= _decode(row["data"])["quantity"]
        elif kind == "inventory.ReservationReleased":
            available += _decode(row["data"])["quantity"]
    return available


async def _reserve(pool: asyncpg.Pool, order_id: uuid.UUID, wanted: dict[str, int], metadata: str) -> None:
    skus = sorted(wanted)
    streams = [f"stock-{sku}" for sku in skus]
    for attempt in range(CONFLICT_RETRIES + 1):
        async with pool.acquire() as conn:
            rows = await conn.fetch(READ_SQL, streams)
            by_stream: dict[str, list] = {}
            for row in rows:
                by_stream.setdefault(row["stream_id"], []).append(row)
            versions, datas = [], []
            for sku, stream in zip(skus, streams, strict=True):
                events = by_stream.get(stream)
                if not events:
                    raise Rejected(422, "Unknown SKU", f"no stock was ever added for SKU {sku!r}")
                available = _available(events)
                if wanted[sku] > available:
                    raise Rejected(
                        409, "Command rejected", f"{sku}: {wanted[sku]} requested, {available} available"
                    )
                versions.append(len(events) + 1)
                datas.append(
                    _encode(
                        {
                            "type": "inventory.StockReserved",
                            "sku": sku,
                            "order_id": str(order_id),
                            "quantity": wanted[sku],
                        }
                    ).decode()
                )
            try:
                await conn.execute(
                    RESERVE_SQL, streams, versions, datas, metadata, order_id, skus, [wanted[s] for s in skus]
                )
                return
            except asyncpg.UniqueViolationError as error:
                if error.constraint_name != "events_stream_version" or attempt == CONFLICT_RETRIES:
                    raise
        await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))  # someone reserved first: decide again


def create_app() -> Litestar:
    pool_holder: dict = {}
    subscribers = list(ORDER_PLACED_SUBSCRIBERS)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        url = os.environ["DATABASE_URL"].replace("postgresql+asyncpg://", "postgresql://")
        pool_holder["pool"] = await asyncpg.create_pool(
            url,
            min_size=2,
            max_size=POOL_SIZE,
            command_timeout=30,
            reset=_keep_session,
            server_settings={"application_name": "bench-baseline"},
        )
        pool_holder["notifier"] = _Notifier(pool_holder["pool"])
        try:
            yield
        finally:
            notifier = pool_holder.pop("notifier")
            if notifier.task is not None:
                with contextlib.suppress(Exception):  # a failed NOTIFY only delayed a wake-up
                    await notifier.task
            await pool_holder.pop("pool").close()

    @get("/health/ready")
    async def ready() -> dict[str, str]:
        async with pool_holder["pool"].acquire() as conn:
            await conn.fetchval("SELECT 1")
        return {"status": "ready"}

    @post("/orders", status_code=201)
    async def place(data: JSONBody[PlaceOrderRequest]) -> Response:
        pool = pool_holder["pool"]
        order_id = uuid.uuid4()
        metadata = _encode({"correlation_id": uuid.uuid4().hex, "causation_id": None}).decode()
        wanted: dict[str, int] = {}
        for item in data.items:
            wanted[item.sku] = wanted.get(item.sku, 0) + item.quantity
        try:
            await _reserve(pool, order_id, wanted, metadata)
        except Rejected as error:
            return Response(
                {"type": "about:blank", "status": error.status, "title": error.title, "detail": error.detail},
                status_code=error.status,
                media_type="application/problem+json",
            )
        lines = [{"sku": i.sku, "quantity": i.quantity} for i in data.items]
        placed_at = datetime.now().astimezone()
        payload = _encode(
            {
                "type": "orders.OrderPlaced",
                "order_id": str(order_id),
                "customer_id": data.customer_id,
                "lines": lines,
                "payment_method": data.payment_method,
            }
        ).decode()
        async with pool.acquire() as conn:
            position, _ = await conn.fetchrow(
                PLACE_SQL, uuid.uuid4(), f"order-{order_id}", payload, metadata, subscribers,
                order_id, data.customer_id, _encode(lines).decode(), data.payment_method, placed_at,
            )  # fmt: skip
        pool_holder["notifier"].written()
        body = OrderPlacedResponse(
            order_id=order_id,
            status="placed",
            customer_id=data.customer_id,
            items=[Line(i.sku, i.quantity) for i in data.items],
            payment_method=data.payment_method,
            position=position,
            placed_at=placed_at,
        )
        return Response(
            body,
            status_code=201,
            headers={"Location": f"/orders/{order_id}", "X-Switchboard-Position": str(position)},
        )

    return Litestar(route_handlers=[ready, place], lifespan=[lifespan], openapi_config=None)


def main(argv: list[str] | None = None) -> None:
    from bench.serve import main as serve_main

    serve_main(["bench.baseline:create_app", *(argv if argv is not None else __import__("sys").argv[1:])])


if __name__ == "__main__":
    main()
