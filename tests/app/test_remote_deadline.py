"""The remote transport's receiving end and the caller's deadline (issue 12): a call whose caller
has already given up is refused without running; otherwise it runs within the time left."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from aiohttp import web
from litestar import Litestar
from litestar.testing import AsyncTestClient

from app.http import EXCEPTION_HANDLERS
from app.mediator import Mediator
from app.messages import Command, DatabaseUnavailable, Unavailable
from app.remote import (
    DEADLINE_AT_HEADER,
    DEADLINE_HEADER,
    MessageCatalog,
    RemoteTransport,
    caller_budget,
    internal_endpoint,
)

TOKEN = "internal-test-token"


class Reserve(Command):
    """A test command, marked safe to send twice (the transport may try another instance)."""

    idempotent = True
    sku: str


def test_the_budget_is_what_is_left_of_the_absolute_deadline():
    assert caller_budget({DEADLINE_AT_HEADER: "1000.5"}, now=1000.0) == 0.5
    assert caller_budget({DEADLINE_AT_HEADER: "999.0"}, now=1000.0) == -1.0  # given up a second ago


def test_the_budget_is_the_shorter_of_the_relative_and_the_absolute_deadline():
    both = {DEADLINE_HEADER: "2.000", DEADLINE_AT_HEADER: "1010.0"}
    assert caller_budget(both, now=1000.0) == 2.0  # a receiver clock behind the caller's
    assert caller_budget(both, now=1009.0) == 1.0  # the call waited in the receiver


def test_no_deadline_header_means_no_budget_and_garbage_is_ignored():
    assert caller_budget({}) is None
    assert caller_budget({DEADLINE_AT_HEADER: "soon"}) is None
    assert caller_budget({DEADLINE_HEADER: "nan", DEADLINE_AT_HEADER: "x"}) is None
    assert caller_budget({DEADLINE_HEADER: "1e9"}) == 300.0  # capped


def receiving_app(runs: list[Reserve]) -> Litestar:
    async def reserve(message: Reserve) -> str:
        runs.append(message)
        return "reserved"

    catalog = MessageCatalog({Reserve: "inventory.Reserve"}, {Reserve: str}, {"Unavailable": Unavailable})
    mediator = Mediator({Reserve: ("inventory", reserve)}, local_modules=frozenset({"inventory"}))
    system = SimpleNamespace(transport=SimpleNamespace(catalog=catalog), mediator=mediator)
    return Litestar([internal_endpoint(TOKEN, lambda: system)], exception_handlers=EXCEPTION_HANDLERS)


async def post(client: AsyncTestClient, headers: dict[str, str]):
    return await client.post(
        "/internal/messages/inventory.Reserve",
        json={"sku": "book"},
        headers={"Authorization": f"Bearer {TOKEN}", **headers},
    )


async def test_a_call_arriving_after_its_callers_absolute_deadline_is_refused_without_running():
    runs: list[Reserve] = []
    async with AsyncTestClient(receiving_app(runs)) as client:
        # sent with 2 s left, read 3 s later (the receiver was paused): the relative budget alone
        # would still run it
        response = await post(client, {DEADLINE_HEADER: "2.000", DEADLINE_AT_HEADER: f"{time.time() - 1:.3f}"})

    assert response.status_code == 503
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == "Unavailable"  # the caller raises Unavailable
    assert "not run" in response.json()["detail"]
    assert runs == []


async def test_a_call_within_its_callers_deadline_runs():
    runs: list[Reserve] = []
    async with AsyncTestClient(receiving_app(runs)) as client:
        response = await post(client, {DEADLINE_HEADER: "2.000", DEADLINE_AT_HEADER: f"{time.time() + 2:.3f}"})

    assert response.status_code == 200 and response.json() == "reserved"
    assert runs == [Reserve(sku="book")]


# --- the calling side -----------------------------------------------------------------------


class FakeRegistry:
    def __init__(self, endpoints: list[tuple[str, str]]) -> None:
        self._endpoints = endpoints

    async def endpoints(self, module: str) -> list[tuple[str, str]]:
        return self._endpoints

    def rotation(self, endpoints: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return list(endpoints)

    def forget(self, module: str) -> None: ...


async def test_the_caller_sends_its_deadline_as_an_absolute_time_and_a_database_outage_comes_back_as_itself():
    """Two instances: the first answers DatabaseUnavailable. The caller raises it at once (the
    database is shared: the second instance cannot do better) and no breaker counts it."""
    seen: list[dict[str, str]] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        body = {"status": 503, "title": "Service unavailable", "code": "DatabaseUnavailable",
                "detail": "the database cannot be reached (ConnectionRefusedError)"}  # fmt: skip
        return web.json_response(body, status=503, content_type="application/problem+json")

    web_app = web.Application()
    web_app.router.add_post("/internal/messages/{name}", answer)
    runner = web.AppRunner(web_app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    catalog = MessageCatalog({Reserve: "inventory.Reserve"}, {Reserve: str}, {"Unavailable": Unavailable})
    endpoint = ("b", f"http://127.0.0.1:{port}")
    transport = RemoteTransport(FakeRegistry([endpoint, endpoint]), catalog, TOKEN)
    await transport.start()
    mediator = Mediator({Reserve: ("inventory", transport.caller("inventory", Reserve))}, breaker_fail_max=1)
    try:
        sent = time.time()
        for _ in range(3):
            with pytest.raises(DatabaseUnavailable):
                await mediator.send(Reserve(sku="book"))
    finally:
        await transport.close()
        await runner.cleanup()

    assert len(seen) == 3  # one instance asked per call
    deadline_at = float(seen[0][DEADLINE_AT_HEADER])
    assert sent + 4 < deadline_at <= time.time() + 5  # the mediator's default deadline, as wall-clock time
    assert mediator.open_breakers() == {}
