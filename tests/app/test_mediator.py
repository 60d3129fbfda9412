"""The mediator's behaviours (deadline, circuit breaker, bulkhead), `inject`, and the start-up checks
in bootstrap. No database: handlers here are plain coroutines."""

from __future__ import annotations

import asyncio
import sys
import time
import types
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import msgspec
import pytest
from aiobreaker import CircuitBreakerState
from prometheus_client import generate_latest

from app import contracts as bootstrap_module  # where the contract files are imported
from app.bootstrap import _check_handled, bootstrap
from app.db import Database, PoolExhausted
from app.deadlines import DEADLINE_MARGIN
from app.mediator import Mediator
from app.messages import Command, CommandRejected, DatabaseUnavailable, NotFound, Query, Unavailable
from app.metrics import METRICS
from app.settings import Settings
from app.wiring import Module, StaleFallback, inject

WAIT = 5.0  # upper bound on any wait in this file: a hang fails the test instead of stalling it


class Ping(Command):
    """A test command."""


class Hurry(Command):
    """A test command with its own deadline."""

    timeout = 0.05


class Lookup(Query):
    """A test query."""


class Recorder:
    """A handler that counts its calls and does whatever the test sets `behaviour` to."""

    def __init__(self, behaviour: Callable[[], Awaitable[Any]] | None = None) -> None:
        self.calls = 0
        self.behaviour = behaviour
        self._reached: dict[int, asyncio.Event] = {}

    def reached(self, calls: int) -> asyncio.Event:
        """Set once the handler has been entered `calls` times."""
        event = self._reached.setdefault(calls, asyncio.Event())
        if self.calls >= calls:
            event.set()
        return event

    async def __call__(self, message: Any) -> Any:
        self.calls += 1
        for calls, event in self._reached.items():
            if self.calls >= calls:
                event.set()
        return await self.behaviour() if self.behaviour else "ok"


def fail_with(error: BaseException) -> Callable[[], Awaitable[Any]]:
    async def behaviour() -> Any:
        raise error

    return behaviour


def block_on(event: asyncio.Event) -> Callable[[], Awaitable[Any]]:
    async def behaviour() -> Any:
        await event.wait()
        return "released"

    return behaviour


def mediator(handlers: dict[type, Any], module: str = "target", **options: Any) -> Mediator:
    settings = {
        "default_timeout": 1.0,
        "breaker_fail_max": 3,
        "breaker_reset_seconds": 30.0,
        "bulkhead_limit": 10,
    } | options
    routes = {t: h if isinstance(h, tuple) else (module, h) for t, h in handlers.items()}
    return Mediator(routes, **settings)


async def trip(m: Mediator, message: Any, times: int) -> None:
    for _ in range(times):
        with pytest.raises((RuntimeError, Unavailable)):
            await m.send(message)


# --- deadline -------------------------------------------------------------------------------


async def test_a_handler_that_outlives_the_default_timeout_raises_unavailable_at_the_deadline():
    m = mediator({Ping: Recorder(block_on(asyncio.Event()))}, default_timeout=0.05)
    started = time.monotonic()

    with pytest.raises(Unavailable) as raised:
        await asyncio.wait_for(m.send(Ping()), WAIT)

    assert 0.05 <= time.monotonic() - started < 1.0
    assert "deadline" in raised.value.detail


async def test_a_message_timeout_class_var_overrides_the_default_timeout():
    m = mediator({Hurry: Recorder(block_on(asyncio.Event()))}, default_timeout=60.0)

    with pytest.raises(Unavailable):
        await asyncio.wait_for(m.send(Hurry()), WAIT)  # the 60 s default would end in TimeoutError


async def test_a_handler_that_answers_before_the_deadline_returns_its_result():
    m = mediator({Lookup: Recorder()}, default_timeout=0.05)

    assert await m.ask(Lookup()) == "ok"


async def test_a_call_that_hangs_after_a_quiet_spell_still_times_out():
    handler = Recorder(lambda: asyncio.sleep(0.01, "ok"))
    m = mediator({Ping: handler}, default_timeout=0.05)
    assert await m.send(Ping()) == "ok"
    await asyncio.sleep(0.1)  # nothing in flight: the deadline sweeper has stopped
    handler.behaviour = block_on(asyncio.Event())

    with pytest.raises(Unavailable, match="deadline"):
        await asyncio.wait_for(m.send(Ping()), WAIT)


async def test_a_call_cancelled_from_outside_is_cancelled_not_timed_out():
    handler = Recorder(block_on(asyncio.Event()))
    m = mediator({Ping: handler}, default_timeout=60.0)
    call = asyncio.create_task(m.send(Ping()))
    await asyncio.wait_for(handler.reached(1).wait(), WAIT)

    call.cancel()

    done, _ = await asyncio.wait({call}, timeout=WAIT)
    assert call in done and call.cancelled()
    assert m.breakers["target"].fail_counter == 0


async def test_a_call_cancelled_from_outside_as_its_deadline_passes_is_cancelled_not_timed_out():
    async def cancelled_twice(message: Ping) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:  # the deadline's cancellation; now the task's owner cancels too
            asyncio.current_task().cancel()
            raise

    m = mediator({Ping: cancelled_twice}, default_timeout=0.05)
    call = asyncio.create_task(m.send(Ping()))

    done, _ = await asyncio.wait({call}, timeout=WAIT)
    assert call in done and call.cancelled()


async def test_a_handler_that_swallows_the_deadlines_cancellation_leaves_no_cancel_request_behind():
    async def stubborn(message: Ping) -> str:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            pass
        return "answered anyway"

    m = mediator({Ping: stubborn}, default_timeout=0.05)

    async def send() -> tuple[str, int]:
        answer = await m.send(Ping())
        return answer, asyncio.current_task().cancelling()

    assert await asyncio.wait_for(asyncio.create_task(send()), WAIT) == ("answered anyway", 0)


async def test_a_loop_stall_past_both_deadlines_still_blames_the_nested_calls_module():
    never = asyncio.Event()

    async def stall_then_hang(message: Lookup) -> None:
        time.sleep(0.15)  # noqa: ASYNC251  # blocks the loop past the inner and the outer deadline
        await never.wait()

    async def call_inner(message: Ping) -> None:
        await m.send(Lookup())

    m = Mediator(
        {Ping: ("outer", call_inner), Lookup: ("inner", stall_then_hang)}, default_timeout=0.1, breaker_fail_max=1
    )

    with pytest.raises(Unavailable) as raised:
        await asyncio.wait_for(m.send(Ping()), WAIT)

    assert raised.value.module == "inner"
    assert m.breakers["outer"].current_state is CircuitBreakerState.CLOSED


# --- circuit breaker ------------------------------------------------------------------------


async def test_after_fail_max_failures_the_breaker_fails_fast_without_calling_the_handler():
    handler = Recorder(fail_with(RuntimeError("database exploded")))
    m = mediator({Ping: handler}, breaker_fail_max=3)
    await trip(m, Ping(), 3)

    with pytest.raises(Unavailable) as raised:
        await m.send(Ping())

    assert handler.calls == 3
    assert "circuit open" in raised.value.detail
    assert raised.value.retry_after >= 1


async def test_failures_below_fail_max_reach_the_caller_as_the_handlers_own_error():
    m = mediator({Ping: Recorder(fail_with(RuntimeError("boom")))}, breaker_fail_max=3)

    for _ in range(2):
        with pytest.raises(RuntimeError):
            await m.send(Ping())

    assert m.breakers["target"].current_state is CircuitBreakerState.CLOSED


async def test_a_success_resets_the_count_of_consecutive_failures():
    handler = Recorder(fail_with(RuntimeError("boom")))
    m = mediator({Ping: handler}, breaker_fail_max=3)
    await trip(m, Ping(), 2)
    handler.behaviour = None
    assert await m.send(Ping()) == "ok"
    handler.behaviour = fail_with(RuntimeError("boom again"))

    await trip(m, Ping(), 2)

    assert m.breakers["target"].current_state is CircuitBreakerState.CLOSED


@pytest.mark.parametrize("zone", ["UTC", "America/New_York", "Asia/Tokyo"])
async def test_an_open_breaker_asks_callers_to_retry_after_its_remaining_reset_time(monkeypatch, zone):
    monkeypatch.setenv("TZ", zone)
    time.tzset()  # aiobreaker mixes utcnow() and now(): the answer must not depend on the zone
    try:
        m = mediator(
            {Ping: Recorder(fail_with(RuntimeError("boom")))}, breaker_fail_max=1, breaker_reset_seconds=30
        )
        await trip(m, Ping(), 1)

        with pytest.raises(Unavailable) as raised:
            await m.send(Ping())
    finally:
        monkeypatch.undo()
        time.tzset()

    assert 29 <= raised.value.retry_after <= 31


async def test_a_successful_call_after_the_reset_time_closes_the_breaker():
    handler = Recorder(fail_with(RuntimeError("boom")))
    m = mediator({Ping: handler}, breaker_fail_max=2, breaker_reset_seconds=0.2)
    await trip(m, Ping(), 2)
    handler.behaviour = None  # the module has recovered

    deadline = time.monotonic() + WAIT
    while True:  # poll until the reset time has passed; each refused call returns at once
        try:
            assert await m.send(Ping()) == "ok"
            break
        except Unavailable:
            assert time.monotonic() < deadline, "the breaker never let a trial call through"
            await asyncio.sleep(0.02)

    assert m.breakers["target"].current_state is CircuitBreakerState.CLOSED
    assert handler.calls == 3  # two failures, then the one trial call


async def test_a_failed_trial_call_after_the_reset_time_opens_the_breaker_again():
    handler = Recorder(fail_with(RuntimeError("boom")))
    m = mediator({Ping: handler}, breaker_fail_max=2, breaker_reset_seconds=0.2)
    await trip(m, Ping(), 2)

    deadline = time.monotonic() + WAIT
    while handler.calls == 2:  # wait for the trial call to reach the handler
        assert time.monotonic() < deadline, "the breaker never let a trial call through"
        with pytest.raises(Unavailable):
            await m.send(Ping())
        await asyncio.sleep(0.02)

    assert handler.calls == 3
    assert m.breakers["target"].current_state is CircuitBreakerState.OPEN


@pytest.mark.parametrize("error", [CommandRejected("out of stock"), NotFound("no such order")])
async def test_business_errors_do_not_open_the_breaker(error):
    handler = Recorder(fail_with(error))
    m = mediator({Ping: handler}, breaker_fail_max=2)

    for _ in range(5):
        with pytest.raises(type(error)):
            await m.send(Ping())

    assert handler.calls == 5
    assert m.breakers["target"].current_state is CircuitBreakerState.CLOSED


async def test_unavailable_raised_by_the_modules_own_handler_counts_against_its_breaker():
    handler = Recorder(fail_with(Unavailable("database is down")))
    m = mediator({Ping: handler}, breaker_fail_max=2)
    await trip(m, Ping(), 2)

    with pytest.raises(Unavailable):
        await m.send(Ping())

    assert handler.calls == 2


async def test_unavailable_from_a_nested_call_to_another_module_does_not_trip_the_callers_breaker():
    inner = Recorder(block_on(asyncio.Event()))  # inventory never answers: Hurry's deadline fires
    m: Mediator

    async def outer(message: Ping) -> Any:
        return await m.send(Hurry())

    m = mediator(
        {Ping: ("orders", outer), Hurry: ("inventory", inner), Lookup: ("orders", Recorder())},
        default_timeout=1.0,
        breaker_fail_max=2,
    )

    for _ in range(5):
        with pytest.raises(Unavailable) as raised:
            await asyncio.wait_for(m.send(Ping()), WAIT)
        assert raised.value.module == "inventory"

    assert m.breakers["inventory"].current_state is CircuitBreakerState.OPEN
    assert m.breakers["orders"].current_state is CircuitBreakerState.CLOSED
    assert await m.ask(Lookup()) == "ok"


# --- bulkhead -------------------------------------------------------------------------------


async def test_a_call_beyond_the_bulkhead_limit_fails_fast_and_later_calls_succeed():
    release = asyncio.Event()
    handler = Recorder(block_on(release))
    m = mediator({Ping: handler}, bulkhead_limit=2)
    blocked = [asyncio.create_task(m.send(Ping())) for _ in range(2)]
    try:
        await asyncio.wait_for(handler.reached(2).wait(), WAIT)  # both calls are inside the handler

        with pytest.raises(Unavailable) as raised:
            await asyncio.wait_for(m.send(Ping()), 0.5)
        assert "concurrency limit" in raised.value.detail
        assert handler.calls == 2
    finally:
        release.set()

    assert await asyncio.wait_for(asyncio.gather(*blocked), WAIT) == ["released", "released"]
    assert await m.send(Ping()) == "released"


async def test_a_full_bulkhead_in_one_module_does_not_refuse_another_modules_calls():
    release = asyncio.Event()
    busy = Recorder(block_on(release))
    m = mediator({Ping: ("busy", busy), Lookup: ("idle", Recorder())}, bulkhead_limit=1)
    blocked = asyncio.create_task(m.send(Ping()))
    await asyncio.wait_for(busy.reached(1).wait(), WAIT)  # "busy" is at its limit

    try:
        assert await m.ask(Lookup()) == "ok"
    finally:
        release.set()
        await asyncio.wait_for(blocked, WAIT)


# --- metrics --------------------------------------------------------------------------------


class Tally(Command):
    """A test command counted only by the metrics test (the series are process-wide)."""


async def test_each_call_is_counted_by_outcome_and_timed_in_the_prometheus_series():
    handler = Recorder()
    m = mediator({Tally: handler}, module="metered")
    await m.send(Tally())
    await m.send(Tally())
    handler.behaviour = fail_with(CommandRejected("no"))
    with pytest.raises(CommandRejected):
        await m.send(Tally())

    METRICS.register()  # as create_app does: nothing registers on import
    text = generate_latest().decode()

    labels = 'message="Tally",module="metered"'
    assert f'switchboard_mediator_calls_total{{{labels},outcome="ok"}} 2.0' in text
    assert f'switchboard_mediator_calls_total{{{labels},outcome="rejected"}} 1.0' in text
    assert f'switchboard_mediator_calls_total{{{labels},outcome="unavailable"}} 0.0' in text
    assert f'switchboard_mediator_seconds_bucket{{le="+Inf",{labels}}} 3.0' in text
    assert f"switchboard_mediator_seconds_count{{{labels}}} 3.0" in text


# --- inject ---------------------------------------------------------------------------------


async def test_inject_binds_each_dependency_by_parameter_name():
    async def handler(message: Ping, clock: Any, uow: Any) -> tuple:
        return message, clock, uow

    call = inject(handler, {"uow": lambda: "the uow", "clock": lambda: "the clock", "unused": lambda: 1 / 0})

    assert await call(Ping()) == (Ping(), "the clock", "the uow")


async def test_inject_runs_providers_once_per_call_so_each_message_gets_a_fresh_dependency():
    made: list[object] = []

    def new_uow() -> object:
        made.append(object())
        return made[-1]

    async def handler(message: Ping, uow: object) -> object:
        return uow

    call = inject(handler, {"uow": new_uow})

    first, second = await call(Ping()), await call(Ping())

    assert first is made[0] and second is made[1] and first is not second


async def test_inject_takes_passed_names_from_the_caller():
    async def handler(message: Ping, uow: str, envelope: str) -> tuple:
        return uow, envelope

    call = inject(handler, {"uow": lambda: "provided"}, passed=("uow", "envelope"))

    assert await call(Ping(), uow="from relay", envelope="env") == ("from relay", "env")


def test_inject_fails_at_start_up_for_a_parameter_no_provider_is_named_after():
    async def handler(message: Ping, uow: Any, payment_gatway: Any) -> None: ...

    with pytest.raises(TypeError, match="payment_gatway"):
        inject(handler, {"uow": lambda: None, "payment_gateway": lambda: None})


# --- bootstrap start-up checks --------------------------------------------------------------


async def noop(message: Any) -> None: ...


def boot(*modules: Module):
    """bootstrap() with fake modules; nothing here touches the database."""
    return bootstrap(
        Settings(instance_id="test"), Database("postgresql://unused/unused"), modules=list(modules)
    )


def fake_contract(monkeypatch, module: str, part: str, *types_: type) -> None:
    """Make `modules.<module>.<part>` importable, declaring the given message types."""
    contract = types.ModuleType(f"modules.{module}.{part}")
    for t in types_:
        t.__module__ = contract.__name__
        setattr(contract, t.__name__, t)
    monkeypatch.setitem(sys.modules, contract.__name__, contract)


def test_two_modules_registering_a_handler_for_the_same_command_fail_at_start_up():
    with pytest.raises(ValueError, match=r"Ping has two handlers: in 'first' and 'second'"):
        boot(Module(name="first", commands={Ping: noop}), Module(name="second", commands={Ping: noop}))


def test_fake_modules_whose_every_message_has_a_handler_boot():
    system = boot(Module(name="first", commands={Ping: noop}), Module(name="second", queries={Lookup: noop}))

    assert system.mediator.route(Ping).module == "first" and system.mediator.route(Lookup).module == "second"


def test_two_modules_providing_a_dependency_of_the_same_name_fail_at_start_up():
    with pytest.raises(
        ValueError, match=r"module 'second' provides 'gateway', already provided by module 'first'"
    ):
        boot(
            Module(name="first", providers={"gateway": lambda: "first's"}),
            Module(name="second", providers={"gateway": lambda: "second's"}),
        )


def test_a_module_providing_a_kernel_dependency_name_fails_at_start_up():
    with pytest.raises(ValueError, match=r"module 'first' provides 'uow', already provided by the kernel"):
        boot(Module(name="first", providers={"uow": lambda: "not a unit of work"}))


def test_a_command_declared_in_commands_py_without_a_handler_fails_at_start_up(monkeypatch):
    class ShipParcel(Command):
        """Declared, never handled."""

    fake_contract(monkeypatch, "shipping", "commands", ShipParcel)

    with pytest.raises(ValueError, match=r"ShipParcel \(modules\.shipping\.commands\) has no handler"):
        boot(Module(name="shipping"))


def test_a_query_declared_in_queries_py_without_a_handler_fails_at_start_up(monkeypatch):
    class GetParcel(Query):
        """Declared, never handled."""

    fake_contract(monkeypatch, "shipping", "queries", GetParcel)

    with pytest.raises(ValueError, match=r"GetParcel \(modules\.shipping\.queries\) has no handler"):
        _check_handled([Module(name="shipping")], {})


def test_a_command_imported_into_commands_py_from_elsewhere_needs_no_handler_there(monkeypatch):
    fake_contract(monkeypatch, "shipping", "commands")
    sys.modules["modules.shipping.commands"].Ping = Ping  # re-exported, declared in this test file

    _check_handled([Module(name="shipping")], {})


def test_a_commands_py_that_fails_to_import_a_dependency_fails_at_start_up(monkeypatch):
    def import_module(name: str) -> Any:
        if name == "modules.shipping.commands":
            raise ModuleNotFoundError("No module named 'yaml'", name="yaml")
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(bootstrap_module, "importlib", types.SimpleNamespace(import_module=import_module))

    with pytest.raises(ModuleNotFoundError, match="yaml"):
        _check_handled([Module(name="shipping")], {})


async def test_a_nested_call_times_out_before_its_caller_and_is_blamed_on_its_own_module():
    never = asyncio.Event()

    async def hang(message: Any) -> None:
        await never.wait()

    async def call_inner(message: Any) -> None:
        await mediator.send(Lookup())

    mediator = Mediator(
        {Ping: ("outer", call_inner), Lookup: ("inner", hang)}, default_timeout=0.3, breaker_fail_max=1
    )

    with pytest.raises(Unavailable) as raised:
        await asyncio.wait_for(mediator.send(Ping()), WAIT)

    assert raised.value.module == "inner"
    assert mediator.breakers["inner"].current_state == CircuitBreakerState.OPEN
    assert mediator.breakers["outer"].current_state == CircuitBreakerState.CLOSED


# --- infrastructure failures (issue 12) -----------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(111, "Connect call failed"),
        OSError("network unreachable"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.TooManyConnectionsError("sorry, too many clients already"),
        asyncpg.InterfaceError("connection is closed"),
        PoolExhausted("no database connection came free before the deadline"),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_database_failures_are_a_database_unavailable_that_never_opens_the_modules_breaker(error):
    handler = Recorder(fail_with(error))
    m = mediator({Ping: handler}, breaker_fail_max=2)

    for _ in range(5):
        with pytest.raises(DatabaseUnavailable) as raised:
            await m.send(Ping())
        assert raised.value.status_code == 503 and raised.value.retry_after >= 1

    assert handler.calls == 5
    assert m.breakers["target"].current_state is CircuitBreakerState.CLOSED
    assert m.open_breakers() == {}


async def test_a_database_failure_in_a_nested_call_opens_neither_module_breaker():
    m: Mediator
    inner = Recorder(fail_with(asyncpg.ConnectionDoesNotExistError("lost")))

    async def outer(message: Ping) -> Any:
        return await m.send(Hurry())

    m = mediator({Ping: ("orders", outer), Hurry: ("inventory", inner)}, breaker_fail_max=2)
    for _ in range(5):
        with pytest.raises(DatabaseUnavailable):
            await m.send(Ping())

    assert inner.calls == 5
    assert m.open_breakers() == {}


async def test_calls_succeed_as_soon_as_the_database_is_back():
    handler = Recorder(fail_with(ConnectionRefusedError(111, "refused")))
    m = mediator({Ping: handler}, breaker_fail_max=2, breaker_reset_seconds=30.0)
    for _ in range(4):
        with pytest.raises(DatabaseUnavailable):
            await m.send(Ping())

    handler.behaviour = None  # the database is back

    assert await m.send(Ping()) == "ok"


async def test_open_breakers_lists_an_open_breaker_until_its_reset_time_is_up():
    m = mediator({Ping: Recorder(fail_with(RuntimeError("bug")))}, breaker_fail_max=2, breaker_reset_seconds=30.0)
    assert m.open_breakers() == {}
    await trip(m, Ping(), 2)

    assert m.open_breakers() == {"target": 30}

    m._watches["target"].at -= 31  # its reset time is up: the next call is the trial
    assert m.open_breakers() == {}


# --- the receiving end's deadline (issue 12) ------------------------------------------------


async def test_dispatch_local_refuses_without_running_a_call_whose_caller_has_given_up():
    handler = Recorder()
    m = mediator({Ping: handler})

    for budget in (0.0, -3.5):
        with pytest.raises(Unavailable, match="after its caller's deadline; not run"):
            await m.dispatch_local(Ping(), budget=budget)

    assert handler.calls == 0


async def test_dispatch_local_runs_a_call_within_the_time_its_caller_has_left():
    m = mediator({Ping: Recorder(block_on(asyncio.Event()))}, default_timeout=60.0)
    started = time.monotonic()

    with pytest.raises(Unavailable, match="deadline"):
        await asyncio.wait_for(m.dispatch_local(Ping(), budget=0.1), WAIT)

    assert 0.1 - DEADLINE_MARGIN <= time.monotonic() - started < 1.0  # it leaves its caller time to answer


# --- fallbacks (issue 12) -------------------------------------------------------------------


class Level(Query):
    """A test query with a fallback."""

    sku: str


class LevelView(msgspec.Struct, frozen=True, kw_only=True):
    sku: str
    units: int
    stale: bool = False


STALE = StaleFallback(mark=lambda view: msgspec.structs.replace(view, stale=True), keep=2)


def counting_levels() -> Recorder:
    recorder = Recorder()

    async def level() -> LevelView:
        return LevelView(sku="a", units=recorder.calls)

    recorder.behaviour = level
    return recorder


async def test_a_query_with_a_fallback_is_answered_stale_while_its_breaker_is_open():
    handler = counting_levels()
    m = mediator({Level: handler}, fallbacks={Level: STALE}, breaker_fail_max=2)
    assert await m.ask(Level(sku="a")) == LevelView(sku="a", units=1)
    handler.behaviour = fail_with(RuntimeError("inventory is broken"))
    with pytest.raises(RuntimeError):  # a failing handler is a failure, not a reason to answer stale
        await m.ask(Level(sku="a"))
    assert await m.ask(Level(sku="a")) == LevelView(sku="a", units=1, stale=True)  # this failure opened it

    assert m.open_breakers() == {"target": 30}
    assert await m.ask(Level(sku="a")) == LevelView(sku="a", units=1, stale=True)
    assert handler.calls == 3  # the open breaker did not call it


async def test_a_query_with_a_fallback_is_answered_stale_while_its_bulkhead_is_full():
    release = asyncio.Event()
    handler = counting_levels()
    m = mediator({Level: handler, Ping: Recorder(block_on(release))}, fallbacks={Level: STALE}, bulkhead_limit=1)
    assert await m.ask(Level(sku="a")) == LevelView(sku="a", units=1)
    blocked = asyncio.create_task(m.send(Ping()))  # same module: its one slot is taken
    try:
        await asyncio.sleep(0)
        assert await m.ask(Level(sku="a")) == LevelView(sku="a", units=1, stale=True)
    finally:
        release.set()
        await asyncio.wait_for(blocked, WAIT)
    assert await m.ask(Level(sku="a")) == LevelView(sku="a", units=2)  # fresh again


async def test_a_query_with_a_fallback_is_answered_stale_when_it_misses_its_deadline():
    handler = counting_levels()
    m = mediator({Level: handler}, fallbacks={Level: STALE}, default_timeout=0.05)
    assert await m.ask(Level(sku="a")) == LevelView(sku="a", units=1)
    handler.behaviour = block_on(asyncio.Event())

    assert await asyncio.wait_for(m.ask(Level(sku="a")), WAIT) == LevelView(sku="a", units=1, stale=True)


async def test_a_query_never_answered_before_is_still_unavailable():
    handler = counting_levels()
    m = mediator({Level: handler}, fallbacks={Level: STALE}, default_timeout=0.05)
    assert await m.ask(Level(sku="a")) == LevelView(sku="a", units=1)
    handler.behaviour = fail_with(Unavailable("down", module="target"))

    with pytest.raises(Unavailable):
        await m.ask(Level(sku="b"))  # another value: never answered here


async def test_the_fallback_keeps_only_the_most_recent_answers():
    handler = Recorder(lambda: asyncio.sleep(0, LevelView(sku="?", units=0)))
    m = mediator({Level: handler}, fallbacks={Level: STALE})  # keep=2
    for sku in ("a", "b", "c"):
        await m.ask(Level(sku=sku))
    handler.behaviour = fail_with(Unavailable("down", module="target"))

    with pytest.raises(Unavailable):
        await m.ask(Level(sku="a"))  # the oldest went
    assert (await m.ask(Level(sku="c"))).stale


async def test_a_command_to_an_unavailable_module_still_raises_unavailable_whatever_its_queries_declare():
    handler = Recorder()
    m = mediator({Ping: handler, Level: counting_levels()}, fallbacks={Level: STALE}, breaker_fail_max=1)
    assert await m.send(Ping()) == "ok"
    await m.ask(Level(sku="a"))
    handler.behaviour = fail_with(Unavailable("down"))
    with pytest.raises(Unavailable):
        await m.send(Ping())

    with pytest.raises(Unavailable, match="circuit open"):
        await m.send(Ping())
    assert (await m.ask(Level(sku="a"))).stale


def test_a_command_cannot_declare_a_fallback():
    with pytest.raises(TypeError, match="Ping is not a Query"):
        mediator({Ping: Recorder()}, fallbacks={Ping: STALE})


def test_a_module_declaring_a_fallback_for_a_command_fails_at_start_up():
    with pytest.raises(ValueError, match=r"module 'first' declares a fallback for Ping: not one of its queries"):
        boot(Module(name="first", commands={Ping: noop}, fallbacks={Ping: STALE}))
