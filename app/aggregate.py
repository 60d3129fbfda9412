"""Event-sourced aggregates: decisions record events, `_apply` folds them into state."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar, Self

from app.messages import Event


class Aggregate:
    stream_type: ClassVar[str]

    def __init__(self, id: Any) -> None:
        self.id = id
        self.version = 0  # version of the last event applied (stored or pending)
        self._pending: list[Event] = []

    @classmethod
    def stream_id_for(cls, id: Any) -> str:
        return f"{cls.stream_type}-{id}"

    @property
    def stream_id(self) -> str:
        return self.stream_id_for(self.id)

    @classmethod
    def rehydrate(cls, id: Any, events: Iterable[Event]) -> Self:
        aggregate = cls(id)
        for event in events:
            aggregate._apply(event)
            aggregate.version += 1
        return aggregate

    @property
    def stored_version(self) -> int:
        """The version the store held when this aggregate was loaded: the expected version."""
        return self.version - len(self._pending)

    def _record(self, event: Event) -> None:
        self._apply(event)
        self.version += 1
        self._pending.append(event)

    def _apply(self, event: Event) -> None:  # pragma: no cover - every aggregate overrides it
        raise NotImplementedError

    def collect_events(self) -> list[Event]:
        events, self._pending = self._pending, []
        return events

    @property
    def pending_events(self) -> list[Event]:
        return list(self._pending)
