"""`serve --workers 2`: whichever worker answers /metrics, the scrape shows the whole instance."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.metrics.scrape import samples, value
from tests.scale.conftest import Cluster, call, start_embedded, wait_for

REQUESTS = 40
SCRAPES = 8
ROUTE = {"method": "GET", "route": "/inventory/items/{sku}", "status": "200"}
CALLS = {"module": "inventory", "message": "GetStockLevel", "outcome": "ok"}


def counts(found: dict) -> tuple[float | None, float]:
    """(HTTP requests to the route, GetStockLevel calls) in one scrape."""
    oks = sum(
        v
        for (name, labels), v in found.items()
        if name == "switchboard_mediator_calls_total" and CALLS.items() <= dict(labels).items()
    )
    return value(found, "switchboard_http_request_duration_seconds_count", **ROUTE), oks


async def test_every_scrape_of_a_two_worker_instance_counts_every_workers_requests(cluster: Cluster, tmp_path):
    server = await start_embedded(cluster, "serve", tmp_path / "data", workers=2)

    async def two_workers():
        return len(server.workers_pids()) == 2

    await wait_for(two_workers, 30, "2 workers")
    # A new connection per request, several at once: both workers accept some of them (the
    # probes' instance ids, one per worker, show it).
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:

        async def get(path: str):
            status, _, body = await call(http, "GET", f"{server.url}{path}")
            assert status == 200, body
            return body

        answered = set()

        async def both_workers_answer():
            answered.update(r["instance"] for r in await asyncio.gather(*(get("/health/ready") for _ in range(10))))
            return len(answered) == 2

        await wait_for(both_workers_answer, 15, "both workers to answer")
        status, _, _ = await call(http, "POST", f"{server.url}/inventory/items", json_body={"sku": "w", "quantity": 5})
        assert status == 201
        for _ in range(REQUESTS // 10):
            await asyncio.gather(*(get("/inventory/items/w") for _ in range(10)))

        async def scrapes() -> list[tuple]:
            texts = await asyncio.gather(*(get("/metrics") for _ in range(SCRAPES)))
            return [counts(samples(text)) for text in texts]

        async def flushed():  # each worker passes its mediator numbers on within a second
            return all(oks == REQUESTS + 1 for _, oks in await scrapes())

        await wait_for(flushed, 15, "every worker's mediator calls in every scrape")
        seen = await scrapes() + await scrapes()
    assert seen == [(REQUESTS, REQUESTS + 1)] * SCRAPES * 2, seen  # the POST asks once too
