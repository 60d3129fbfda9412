"""Which events cross to another database. With a broker, a process group (one or more identical
replicas) owns one database and the modules it hosts; every other module lives behind another
database. An event appended here is written to this outbox once for each subscriber hosted here,
as always, plus once for the publisher (`broker.publish`) if any subscriber lives elsewhere -- one
message on the stream however many remote subscribers it has. On the far side, each hosted
subscriber consumes from the stream only the events of modules it does not host: an event of its
own group reaches it through its own outbox, and reading it from the stream as well would
deliver it twice."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence

from app.contracts import load_contract
from app.wiring import Module

PUBLISHER = "broker.publish"


def event_owners(modules: Iterable[Module]) -> dict[type, str]:
    """Each event type's module: the one whose contract (events.py) defines it."""
    return {event: m.name for m in modules for event in load_contract(m.contract_package).events}


def through_broker(
    subscribers: Mapping[type, Sequence[str]], hosted: Collection[str]
) -> dict[type, list[str]]:
    """The outbox routes of a process group: hosted subscribers, and the publisher in place of
    all the others."""
    routes: dict[type, list[str]] = {}
    for event_type, names in subscribers.items():
        here = [name for name in names if name.split(".", 1)[0] in hosted]
        if len(here) < len(names):
            here.append(PUBLISHER)
        routes[event_type] = here
    return routes


def consumed_topics(
    subscriptions: Mapping[str, object], owners: Mapping[type, str], hosted: Collection[str]
) -> dict[str, list[str]]:
    """Each hosted subscriber's topics that come from another group's module (none: no consumer)."""
    topics: dict[str, list[str]] = {}
    for name, bound in subscriptions.items():
        if name.split(".", 1)[0] not in hosted or bound.handler is None:
            continue
        remote = sorted(t.topic() for t in bound.event_types if owners.get(t) not in hosted)
        if remote:
            topics[name] = remote
    return topics
