"""P2: the relay's throughput and commit→handler lag, and procrastinate's on the same database.

Relay: `app.relay.Relay` in this process over `bootstrap(settings, db, modules=[BENCH])` — one
tiny module whose subscriber does nothing — with production-default settings (batch 200, pool
20, so 10 deliveries at once). Every delivery is the real one: its own transaction, the inbox
row, the handler, commit; acknowledgements in batches.

- throughput: N events with one outbox row each (each event on its own stream, as every order is)
  are inserted in one statement, then a started relay drains them; events/s = N / time to drain.
- lag: events are appended at a fixed rate with the app's own APPEND_SQL (event + outbox row in
  one statement, one commit, no NOTIFY inside it), open-loop, from a second pool (the "web"
  side), each followed by `outbox_written()` as UnitOfWork.commit does. The relay listens on its
  own pool, so no in-process callback reaches it: it is woken as a relay in another process is,
  by the producer's coalesced NOTIFY (sent after the commits, at most one per notify interval),
  then lingers `relay_linger_seconds` before it claims. The handler notes when it runs. Lag from
  commit = handler start − the moment the append returned; lag from send = handler start − the
  moment the append was issued (includes the commit itself). Same process, same clock.

procrastinate: the same two measurements for a no-op task on the same database: jobs deferred in
bulk then one worker (concurrency 10, like the relay) run until the queue is empty; and jobs
deferred one by one at the same fixed rate while a worker runs, lag = task start − defer returned.
"""

from __future__ import annotations

import asyncio
import resource
import time
import uuid
from dataclasses import replace

import msgspec

from app.bootstrap import bootstrap
from app.db import Database
from app.eventstore import APPEND_SQL
from app.messages import Event
from app.relay import Relay
from app.settings import Settings
from app.wiring import Module, Subscription
from bench.loadgen import percentile

perf = time.perf_counter


class Ping(Event, tag="bench.Ping"):
    seq: int


class _Recorder:
    """Handler start times by sequence number (-1 = throughput run, not recorded)."""

    def __init__(self) -> None:
        self.seen: dict[int, float] = {}

    def hit(self, seq: int) -> None:
        if seq >= 0:
            self.seen[seq] = perf()


RECORDER = _Recorder()


async def noop(event: Ping) -> None:
    RECORDER.hit(event.seq)


BENCH = Module(name="bench", subscriptions={Ping: [Subscription("bench.noop", noop)]})

BULK_SQL = """
WITH ev AS (
    INSERT INTO events (event_id, stream_id, version, type, data)
    SELECT gen_random_uuid(), 'bench-' || $2::text || '-' || g, 1, 'bench.Ping',
           jsonb_build_object('type', 'bench.Ping', 'seq', -1)
    FROM generate_series(1, $1::int) AS g
    RETURNING position, event_id, stream_id, type, data, metadata
)
INSERT INTO outbox (message_id, position, subscriber, type, partition_key, payload, headers)
SELECT event_id, position, 'bench.noop', type, stream_id, data, metadata FROM ev ORDER BY position
"""


def _pcts(values: list[float], prefix: str) -> dict:
    values = sorted(values)
    if not values:
        return {f"{prefix}_p50_ms": None, f"{prefix}_p99_ms": None, f"{prefix}_max_ms": None}
    return {
        f"{prefix}_p50_ms": round(percentile(values, 50) * 1000, 2),
        f"{prefix}_p99_ms": round(percentile(values, 99) * 1000, 2),
        f"{prefix}_max_ms": round(values[-1] * 1000, 2),
    }


def _cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


class _Paced:
    """Runs `send(seq)` at a fixed rate, open-loop (a task per send, the schedule never waits),
    and records when each send was issued and when it returned."""

    def __init__(self, rate: float, duration: float) -> None:
        self.rate, self.n = rate, int(rate * duration)
        self.sent: dict[int, float] = {}
        self.done: dict[int, float] = {}
        self.errors = 0

    async def run(self, send) -> None:
        tasks = []

        async def one(seq: int) -> None:
            self.sent[seq] = perf()
            try:
                await send(seq)
                self.done[seq] = perf()
            except Exception:
                self.errors += 1

        t0, interval, i = perf(), 1.0 / self.rate, 0
        while i < self.n:
            due = min(self.n, int((perf() - t0) / interval) + 1)
            while i < due:
                tasks.append(asyncio.create_task(one(i)))
                i += 1
            await asyncio.sleep(max(t0 + i * interval - perf(), 0.001))
        await asyncio.gather(*tasks)

    def lags(self, seen: dict[int, float]) -> dict:
        from_commit = [seen[s] - self.done[s] for s in seen if s in self.done]
        from_send = [seen[s] - self.sent[s] for s in seen if s in self.sent]
        insert = [self.done[s] - self.sent[s] for s in self.done]
        return {
            **_pcts(from_commit, "lag_from_commit"),
            **_pcts(from_send, "lag_from_send"),
            **_pcts(insert, "enqueue"),
            "negative_lags": sum(1 for v in from_commit if v < 0),  # handler ran before the producer resumed
        }


async def _wait_for(predicate, limit: float) -> bool:
    deadline = perf() + limit
    while not predicate():
        if perf() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


# -- the relay -------------------------------------------------------------------------------------


async def relay_throughput(url: str, events: int, limit: float) -> dict:
    settings = replace(Settings(), database_url=url, instance_id="bench-relay")
    db = await Database(url, max_size=settings.db_pool_size).connect()
    try:
        system = bootstrap(settings, db, modules=[BENCH])
        relay = Relay(system)
        started = perf()
        await db.execute(BULK_SQL, events, uuid.uuid4().hex[:8])
        await db.execute("ANALYZE outbox")
        insert_seconds = perf() - started
        RECORDER.seen.clear()
        cpu0, t0 = _cpu(), perf()
        relay.start()
        finished = await _wait_for(lambda: relay.delivered >= events, limit)
        elapsed = perf() - t0
        cpu = (_cpu() - cpu0) / elapsed
        await relay.stop()
        inbox = await db.fetchval("SELECT count(*) FROM inbox WHERE subscriber = 'bench.noop'")
        left = await db.fetchval(
            "SELECT count(*) FROM outbox WHERE subscriber = 'bench.noop' AND status <> 'delivered'"
        )
        return {
            "measurement": "p2_relay_throughput",
            "events": events,
            "delivered": relay.delivered,
            "finished": finished,
            "seconds": round(elapsed, 3),
            "events_per_s": round(relay.delivered / elapsed, 1),
            "insert_seconds": round(insert_seconds, 3),
            "inbox_rows": inbox,
            "outbox_left": left,
            "batch_size": settings.relay_batch_size,
            "concurrency": relay.concurrency,
            "cpu_bench_process": round(cpu, 3),
        }
    finally:
        await db.close()


WARMUP_SEQ = 1_000_000_000  # warm-up sends are numbered from here, and not measured


async def _warm_up(send, rate: float, seconds: float, limit: float) -> None:
    """Send at the measured rate for `seconds` and wait until all of it arrived, then forget it:
    the window starts with the pages the load touches written once since the CHECKPOINT before
    it (their full-page images are in the WAL), the pool and the statements warm -- for the relay
    and procrastinate alike."""
    if seconds <= 0:
        return
    warm = _Paced(rate, seconds)
    await warm.run(lambda seq: send(WARMUP_SEQ + seq))
    await _wait_for(lambda: sum(1 for s in RECORDER.seen if s >= WARMUP_SEQ) >= warm.n - warm.errors, limit)
    RECORDER.seen.clear()


async def relay_lag(url: str, rate: float, duration: float, limit: float, warmup: float = 0.0) -> dict:
    settings = replace(Settings(), database_url=url, instance_id="bench-relay-lag")
    db = await Database(url, max_size=settings.db_pool_size).connect()
    producer = await Database(url, max_size=20).connect()  # the "web" side: its own pool, default size
    try:
        system = bootstrap(settings, db, modules=[BENCH])
        relay = Relay(system)
        RECORDER.seen.clear()
        relay.start()
        await asyncio.sleep(0.3)  # listener connected
        paced = _Paced(rate, duration)
        encode = msgspec.json.Encoder().encode
        metadata = encode({"correlation_id": None, "causation_id": None}).decode()
        run_id = uuid.uuid4().hex[:8]

        async def send(seq: int) -> None:
            eid = uuid.uuid4()
            data = encode(Ping(seq=seq)).decode()
            await producer.fetchrow(
                APPEND_SQL,
                [eid],
                [f"bench-lag-{run_id}-{seq}"],
                [1],
                ["bench.Ping"],
                [data],
                [metadata],
                [eid],
                ["bench.noop"],
            )
            producer.outbox_written()  # as UnitOfWork.commit does: the coalesced NOTIFY wakes the relay

        await _warm_up(send, rate, warmup, limit)
        cpu0, t0 = _cpu(), perf()
        await paced.run(send)
        finished = await _wait_for(lambda: len(RECORDER.seen) >= paced.n - paced.errors, limit)
        elapsed = perf() - t0
        cpu = (_cpu() - cpu0) / elapsed
        await relay.stop()
        return {
            "measurement": "p2_relay_lag",
            "rate": rate,
            "duration": duration,
            "warmup": warmup,
            "events": paced.n,
            "producer_errors": paced.errors,
            "delivered": len(RECORDER.seen),
            "finished": finished,
            **paced.lags(RECORDER.seen),
            "cpu_bench_process": round(cpu, 3),
        }
    finally:
        await producer.close()
        await db.close()


# -- procrastinate ---------------------------------------------------------------------------------


def _procrastinate_app(url: str, max_size: int):
    import procrastinate

    app = procrastinate.App(
        connector=procrastinate.PsycopgConnector(conninfo=url, min_size=1, max_size=max_size)
    )

    @app.task(name="bench_noop", pass_context=False)
    async def bench_noop(seq: int) -> None:
        RECORDER.hit(seq)

    return app


async def _procrastinate_schema(url: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        exists = await conn.fetchval("SELECT to_regclass('procrastinate_jobs') IS NOT NULL")
    finally:
        await conn.close()
    if not exists:
        app = _procrastinate_app(url, 2)
        async with app.open_async():
            await app.schema_manager.apply_schema_async()


WORKER = dict(concurrency=10, install_signal_handlers=False, listen_notify=True, name="bench-worker")


async def procrastinate_throughput(url: str, jobs: int, limit: float) -> dict:
    await _procrastinate_schema(url)
    app = _procrastinate_app(url, 20)
    async with app.open_async():
        task = app.tasks["bench_noop"]
        started = perf()
        for first in range(0, jobs, 1000):
            await task.batch_defer_async(*({"seq": -1} for _ in range(first, min(jobs, first + 1000))))
        defer_seconds = perf() - started
        cpu0, t0 = _cpu(), perf()
        try:
            async with asyncio.timeout(limit):
                await app.run_worker_async(wait=False, **WORKER)
            finished = True
        except TimeoutError:
            finished = False
        elapsed = perf() - t0
        cpu = (_cpu() - cpu0) / elapsed
        async with app.connector.pool.connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'")
            succeeded = (await cur.fetchone())[0]
            await conn.execute("DELETE FROM procrastinate_jobs")
    return {
        "measurement": "p2_procrastinate_throughput",
        "jobs": jobs,
        "succeeded": succeeded,
        "finished": finished,
        "seconds": round(elapsed, 3),
        "jobs_per_s": round(succeeded / elapsed, 1),
        "defer_seconds": round(defer_seconds, 3),
        "concurrency": WORKER["concurrency"],
        "cpu_bench_process": round(cpu, 3),
    }


async def procrastinate_lag(
    url: str, rate: float, duration: float, limit: float, warmup: float = 0.0
) -> dict:
    await _procrastinate_schema(url)
    worker_app = _procrastinate_app(url, 20)
    producer_app = _procrastinate_app(url, 20)
    RECORDER.seen.clear()
    async with worker_app.open_async(), producer_app.open_async():
        worker = asyncio.create_task(worker_app.run_worker_async(wait=True, **WORKER))
        await asyncio.sleep(0.5)  # worker registered and listening
        paced = _Paced(rate, duration)
        deferrer = producer_app.configure_task(name="bench_noop")

        async def send(seq: int) -> None:
            await deferrer.defer_async(seq=seq)

        await _warm_up(send, rate, warmup, limit)
        cpu0, t0 = _cpu(), perf()
        await paced.run(send)
        finished = await _wait_for(lambda: len(RECORDER.seen) >= paced.n - paced.errors, limit)
        elapsed = perf() - t0
        cpu = (_cpu() - cpu0) / elapsed
        worker.cancel()
        try:
            await worker
        except asyncio.CancelledError:
            pass
        async with worker_app.connector.pool.connection() as conn:
            await conn.execute("DELETE FROM procrastinate_jobs")
    return {
        "measurement": "p2_procrastinate_lag",
        "rate": rate,
        "duration": duration,
        "warmup": warmup,
        "jobs": paced.n,
        "producer_errors": paced.errors,
        "delivered": len(RECORDER.seen),
        "finished": finished,
        **paced.lags(RECORDER.seen),
        "cpu_bench_process": round(cpu, 3),
    }
