"""Per-request / per-message context carried through the mediator and into event metadata."""

from __future__ import annotations

import uuid
from contextvars import ContextVar

correlation_id: ContextVar[str | None] = ContextVar("correlation_id", default=None)
causation_id: ContextVar[str | None] = ContextVar("causation_id", default=None)
# What is being handled, for the log lines (app/observe.py reads them when a line is written):
scope: ContextVar[tuple[str, str] | None] = ContextVar("scope", default=None)  # (module, message type)
delivery: ContextVar[tuple[str, int, int] | None] = ContextVar("delivery", default=None)  # (subscriber, outbox id, attempt)


def current_correlation_id() -> str:
    """The correlation id of the work in progress; a fresh one outside any request."""
    value = correlation_id.get()
    if value is None:
        value = uuid.uuid4().hex
        correlation_id.set(value)
    return value
