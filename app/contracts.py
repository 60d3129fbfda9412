"""A module's public contract, found in its files rather than listed by hand: the commands,
queries, events and errors defined in `<package>.commands`, `.queries` and `.events`."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType

from app.messages import Command, Event, Query, SwitchboardError

PARTS = ("commands", "queries", "events")


@dataclass
class Contract:
    """The message and error classes one module's contract files define (not those they import)."""

    package: str
    commands: list[type[Command]] = field(default_factory=list)
    queries: list[type[Query]] = field(default_factory=list)
    events: list[type[Event]] = field(default_factory=list)
    errors: list[type[SwitchboardError]] = field(default_factory=list)
    defined_in: dict[type, str] = field(default_factory=dict)  # class -> the file's dotted name


def load_contract(package: str) -> Contract:
    """Import `package`.commands, .queries and .events. A file that does not exist is no contract;
    a file that exists but fails to import (it imports something missing) is an error."""
    contract = Contract(package)
    for part in PARTS:
        source = _import(f"{package}.{part}")
        if source is None:
            continue
        for value in vars(source).values():
            if not isinstance(value, type) or value.__module__ != source.__name__:
                continue  # re-exported from elsewhere: its own module's contract declares it
            for kind, listed in (
                (Command, contract.commands),
                (Query, contract.queries),
                (Event, contract.events),
                (SwitchboardError, contract.errors),
            ):
                if issubclass(value, kind):
                    listed.append(value)
                    contract.defined_in[value] = source.__name__
    return contract


def _import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name is not None and (name + ".").startswith(error.name + "."):
            return None  # the module has no such file (or its package does not exist)
        raise
