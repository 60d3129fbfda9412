"""Wiring: the only kernel file that knows the modules. Binds handler dependencies by name and
builds the Mediator, the event catalog and the subscription table the relay delivers from."""

from __future__ import annotations

import importlib
import time
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.contracts import load_contract
from app.db import Database
from app.eventstore import EventCatalog
from app.mediator import Mediator
from app.messages import CommandRejected, ConcurrencyError, NotFound, SwitchboardError, Unavailable
from app.registry import Registry
from app.remote import MessageCatalog, RemoteTransport
from app.settings import Settings
from app.uow import UnitOfWork
from app.wiring import Module, Subscription, inject, inject_task

if typing.TYPE_CHECKING:
    from app.broker.rpc import NatsTransport

RELAY_PASSES = ("uow", "envelope")  # subscriber parameters the relay fills per delivery
PROJECTION_PASSES = ("uow",)  # an inline projection's: the unit appending the event
COMPENSATOR_PASSES = (*RELAY_PASSES, "error")  # and an on_dead_letter's: the failure's summary

MODULES: tuple[str, ...] = ("inventory", "orders", "payments", "notifications")


def load_modules(names: Sequence[str] = MODULES) -> list[Module]:
    return [importlib.import_module(f"modules.{name}.module").module for name in names]


@dataclass
class BoundSubscription:
    subscription: Subscription
    event_types: list[type]
    handler: Callable[..., Any] | None  # await handler(event, uow=uow); None when not hosted here
    compensator: Callable[..., Any] | None = None  # its on_dead_letter, bound; None: none, or not hosted


@dataclass
class System:
    settings: Settings
    db: Database
    modules: list[Module]
    hosted: frozenset[str]
    catalog: EventCatalog
    mediator: Mediator
    subscriptions: dict[str, BoundSubscription]
    registry: Registry
    transport: RemoteTransport | NatsTransport
    background: list[Callable[[], Any]] = field(default_factory=list)
    # with a broker: each hosted subscriber's topics that come from another group's module
    from_broker: dict[str, list[str]] = field(default_factory=dict)
    # inbox names whose rows the purge must keep for now (fed from a broker; see purge.py)
    inbox_holds: Callable[[], Collection[str]] = lambda: ()

    def uow(self) -> UnitOfWork:
        return UnitOfWork(self.db, self.catalog)

    @property
    def hosted_subscribers(self) -> list[str]:
        return [name for name, s in self.subscriptions.items() if s.subscription.module in self.hosted]


def bootstrap(
    settings: Settings,
    db: Database,
    *,
    modules: Sequence[Module] | None = None,
    overrides: Mapping[str, Callable[[], Any]] | None = None,
) -> System:
    """Build the system. Every module's subscriptions are known (so outbox rows are written for
    all subscribers), but only hosted modules' handlers run here."""
    modules = list(modules if modules is not None else load_modules())
    hosted = frozenset(settings.modules or [m.name for m in modules])
    unknown = hosted - {m.name for m in modules}
    if unknown:
        raise ValueError(f"SWITCHBOARD_MODULES names unknown modules: {sorted(unknown)}")

    subscribers: dict[type, list[str]] = {}
    for module in modules:
        for event_type, subs in module.subscriptions.items():
            for sub in subs:
                if sub.module != module.name:
                    raise ValueError(f"subscription {sub.name!r} must be named '{module.name}.<handler>'")
                subscribers.setdefault(event_type, []).append(sub.name)
    if settings.nats_url:  # subscribers behind another database: one row for the broker instead
        from app.broker.routes import through_broker

        subscribers = through_broker(subscribers, hosted)
    # every event type a module defines, subscribed to or not: its own aggregates replay them
    catalog = EventCatalog(subscribers, [t for m in modules for t in load_contract(m.contract_package).events])

    registry = Registry(
        db,
        instance_id=settings.instance_id,
        modules=sorted(hosted),
        base_url=settings.base_url,
        interval=settings.heartbeat_seconds,
    )
    messages = _message_catalog(modules)
    transport: RemoteTransport | NatsTransport
    if settings.nats_url is None:
        transport = RemoteTransport(registry, messages, settings.internal_token)
    else:  # another process group may have another database: no shared registry to find it in
        from app.broker.rpc import NatsTransport

        transport = NatsTransport(messages, settings.internal_token, default_timeout=settings.default_timeout)
    system = System(
        settings, db, modules, hosted, catalog, mediator=None, subscriptions={}, registry=registry, transport=transport
    )  # type: ignore[arg-type]
    providers: dict[str, Callable[[], Any]] = {
        "uow": system.uow,
        "mediator": lambda: system.mediator,
        "settings": lambda: settings,
        "db": lambda: db,
        "clock": lambda: time.time,
        "new_uow": lambda: system.uow,
    }
    owners = dict.fromkeys(providers, "the kernel")
    for module in modules:
        for name, provide in module.providers.items():
            if name in owners:  # silently replacing it would hand one module's port to another
                raise ValueError(
                    f"module {module.name!r} provides {name!r}, already provided by {owners[name]}"
                )
            owners[name] = f"module {module.name!r}"
            providers[name] = provide
    providers.update(overrides or {})
    # every module's, hosted here or not: a projection runs wherever its event is appended
    catalog.projections = _bind_projections(modules, providers)

    handlers: dict[type, tuple[str, Callable]] = {}
    for module in modules:
        for message_type, handler in {**module.commands, **module.queries}.items():
            if message_type in handlers:
                raise ValueError(
                    f"{message_type.__name__} has two handlers: in {handlers[message_type][0]!r} and {module.name!r}"
                )
            if module.name in hosted:
                handlers[message_type] = (module.name, inject(handler, providers))
            else:  # same send()/ask(), same behaviours: the handler just runs in another process
                handlers[message_type] = (module.name, transport.caller(module.name, message_type))
    _check_handled(modules, handlers)
    for module in modules:
        for message_type in module.fallbacks:
            if message_type not in module.queries:  # commands never fall back: their effect cannot be made up
                raise ValueError(f"module {module.name!r} declares a fallback for {message_type.__name__}: not one of its queries")
    system.mediator = Mediator(
        handlers,
        default_timeout=settings.default_timeout,
        breaker_fail_max=settings.breaker_fail_max,
        breaker_reset_seconds=settings.breaker_reset_seconds,
        bulkhead_limit=settings.bulkhead_limit,
        conflict_retries=settings.conflict_retries,
        local_modules=hosted,
        # every module's, hosted here or not: the caller's side keeps the answers and falls back
        fallbacks={t: f for m in modules for t, f in m.fallbacks.items()},
    )
    for module in modules:
        for event_type, subs in module.subscriptions.items():
            for sub in subs:
                bound = system.subscriptions.get(sub.name)
                if bound is None:
                    handler = compensator = None
                    if module.name in hosted:
                        handler = inject(sub.handler, providers, passed=RELAY_PASSES)
                        if sub.on_dead_letter is not None:
                            compensator = inject(sub.on_dead_letter, providers, passed=COMPENSATOR_PASSES)
                    system.subscriptions[sub.name] = BoundSubscription(sub, [event_type], handler, compensator)
                elif bound.subscription is sub:  # one subscription may take several event types
                    bound.event_types.append(event_type)
                else:
                    raise ValueError(f"two different subscriptions are named {sub.name!r}")
        for sub in module.retired:  # no event routes to it: it only drains the rows already written
            if sub.module != module.name:
                raise ValueError(f"subscription {sub.name!r} must be named '{module.name}.<handler>'")
            if sub.name in system.subscriptions:
                raise ValueError(f"two different subscriptions are named {sub.name!r}")
            handler = inject(sub.handler, providers, passed=RELAY_PASSES) if module.name in hosted else None
            system.subscriptions[sub.name] = BoundSubscription(sub, [], handler)
        if module.name in hosted:
            system.background.extend(inject_task(task, providers) for task in module.background)
    if settings.nats_url:  # until a live broker link says its consumers have caught up: all held
        from app.broker.apply import taken_name
        from app.broker.routes import consumed_topics, event_owners

        system.from_broker = consumed_topics(system.subscriptions, event_owners(modules), hosted)
        held = frozenset(map(taken_name, system.from_broker))
        system.inbox_holds = lambda: held
    return system


def _bind_projections(modules: Sequence[Module], providers: Mapping[str, Callable[[], Any]]) -> dict[type, list]:
    """Each event type's inline projections, bound, in module order. Only a module's own events:
    another module's reach it through the outbox, as a subscription, so that its transactions
    stay its own."""
    projections: dict[type, list] = {}
    for module in modules:
        own = set(load_contract(module.contract_package).events)
        for event_type, handlers in module.projections.items():
            if event_type not in own:
                raise ValueError(
                    f"module {module.name!r} projects {getattr(event_type, '__name__', event_type)} inline, but that is not its own event: "
                    "subscribe to it instead (Module(subscriptions=...))"
                )
            for handler in handlers if isinstance(handlers, (list, tuple)) else (handlers,):
                projections.setdefault(event_type, []).append(inject(handler, providers, passed=PROJECTION_PASSES))
    return projections


def _check_handled(modules: Sequence[Module], handlers: Mapping[type, Any]) -> None:
    """Every Command and Query a module defines in commands.py / queries.py needs its handler."""
    for module in modules:
        contract = load_contract(module.contract_package)
        for message_type in (*contract.commands, *contract.queries):
            if message_type not in handlers:
                where = module.contract_package.replace(".", "/")
                raise ValueError(
                    f"{message_type.__name__} ({contract.defined_in[message_type]}) has no handler: "
                    f"register it in {where}/module.py"
                )


def _message_catalog(modules: Sequence[Module]) -> MessageCatalog:
    """Wire names, result types (the handlers' return annotations) and error classes by name,
    for every module, hosted here or not: what the remote transport needs on both ends."""
    names: dict[type, str] = {}
    results: dict[type, Any] = {}
    errors: dict[str, type[SwitchboardError]] = {
        e.__name__: e for e in (CommandRejected, NotFound, Unavailable, ConcurrencyError)
    }
    for module in modules:
        for message_type, handler in {**module.commands, **module.queries}.items():
            names[message_type] = f"{module.name}.{message_type.__name__}"
            result = typing.get_type_hints(handler).get("return", Any)
            results[message_type] = type(None) if result is None else result
        for error in load_contract(module.contract_package).errors:
            errors.setdefault(error.__name__, error)
    return MessageCatalog(names, results, errors)
