"""The remote transport's receiving end and the caller's deadline (issue 12): a call whose caller
has already given up is refused without running; otherwise it runs within the time left."""

from __future__ import annotations

import time
from types import SimpleNamespace

from litestar import Litestar
from litestar.testing import AsyncTestClient

from app.http import EXCEPTION_HANDLERS
from app.mediator import Mediator
from app.messages import Command, Unavailable
from app.remote import DEADLINE_AT_HEADER, DEADLINE_HEADER, MessageCatalog, caller_budget, internal_endpoint

TOKEN = "internal-test-token"


class Reserve(Command):
    """A test command."""

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
