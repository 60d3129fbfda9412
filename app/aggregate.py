"""Event-sourced aggregates: decisions record events, `_apply` folds them into state."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar, Self

from app.messages import Event


class Aggregate:
    stream_type: ClassVar[str]
    # Every N events the unit of work stores the state as a snapshot, and loads start from the
    # latest one instead of replaying the whole stream. 0: never (short-lived streams).
    snapshot_every: ClassVar[int] = 0

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

    @classmethod
    def from_snapshot(cls, id: Any, version: int, state: Any, events: Iterable[Event]) -> Self:
        aggregate = cls(id)
        aggregate.restore(state)
        aggregate.version = version
        for event in events:
            aggregate._apply(event)
            aggregate.version += 1
        return aggregate

    def snapshot(self) -> Any:  # pragma: no cover - aggregates with snapshot_every override it
        """The state as JSON-encodable data; `restore(snapshot())` must rebuild the same state."""
        raise NotImplementedError

    def restore(self, state: Any) -> None:  # pragma: no cover
        raise NotImplementedError

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
