"""The event store: the catalog of event types, and the SQL that loads and appends streams."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec

from app.messages import Event


class EventCatalog:
    """Every event type by topic, and the subscription names each one fans out to."""

    def __init__(self, subscribers: Mapping[type[Event], Sequence[str]], types: Sequence[type[Event]] = ()):
        self.types: dict[str, type[Event]] = {t.topic(): t for t in (*types, *subscribers)}
        self.subscribers: dict[type[Event], tuple[str, ...]] = {t: tuple(s) for t, s in subscribers.items()}
        self._decoders = {topic: msgspec.json.Decoder(t) for topic, t in self.types.items()}

    def decode(self, topic: str, data: str | bytes) -> Event:
        try:
            return self._decoders[topic].decode(data)
        except KeyError:
            raise LookupError(f"unknown event type {topic!r}: is its module in MODULES?") from None
