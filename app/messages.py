"""The message contract every module speaks: commands, queries, events and the errors they raise."""

from __future__ import annotations

from typing import ClassVar

import msgspec


class Command(msgspec.Struct, frozen=True, kw_only=True):
    """Asks the owning module to change something; exactly one handler."""

    timeout: ClassVar[float | None] = None  # seconds; None = the mediator's default
    idempotent: ClassVar[bool] = False  # safe to send twice (remote transport may retry it)


class Query(msgspec.Struct, frozen=True, kw_only=True):
    """Asks the owning module for data; never changes anything."""

    timeout: ClassVar[float | None] = None
    idempotent: ClassVar[bool] = True


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """A fact a module recorded; its tag is the stable topic stored in `events` and `outbox`."""

    @classmethod
    def topic(cls) -> str:
        return cls.__struct_config__.tag


class SwitchboardError(Exception):
    """Base of the errors that cross module boundaries; each maps to one HTTP status."""

    status_code: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail)
        self.detail = detail


class CommandRejected(SwitchboardError):
    """The owning module said no for a business reason (insufficient stock, …): 409."""

    status_code = 409
    title = "Command rejected"


class NotFound(SwitchboardError):
    status_code = 404
    title = "Not found"


class Unavailable(SwitchboardError):
    """The target module cannot answer now (breaker open, timeout, bulkhead full, database down): 503."""

    status_code = 503
    title = "Service unavailable"

    def __init__(self, detail: str = "", retry_after: int = 1, module: str | None = None) -> None:
        super().__init__(detail)
        self.retry_after = retry_after
        # The module that is unavailable, when known: the mediator counts the error against that
        # module's breaker only, not against the breaker of a caller that merely passed it on.
        self.module = module


class DatabaseUnavailable(Unavailable):
    """The database cannot be reached (down, restarting, connection lost, pool exhausted): no
    module's fault, so no module's circuit breaker counts it, and calls succeed again as soon as
    the database is back."""


class ConcurrencyError(SwitchboardError):
    """Another writer appended to the stream first; the mediator re-runs the command."""

    status_code = 409
    title = "Concurrent modification"


class PermanentError(Exception):
    """Raised by a subscriber for a failure retrying cannot fix: the relay dead-letters at once."""


def text_error(field: str, value: str, max_length: int) -> str | None:
    """Why `value` cannot be the text field `field` of a message, or None. Commands check their
    own fields with it, so the HTTP edge and `/internal/messages` refuse the same things; NUL is
    refused because PostgreSQL text cannot hold it."""
    if not isinstance(value, str):
        return f"{field} must be a string"
    if not value:
        return f"{field} must not be empty"
    if len(value) > max_length:
        return f"{field} is longer than {max_length} characters"
    if "\x00" in value:
        return f"{field} contains a NUL character"
    return None


def count_error(field: str, value: int, low: int, high: int) -> str | None:
    """Why `value` is not a whole number in [low, high] for `field`, or None."""
    if not isinstance(value, int) or isinstance(value, bool):
        return f"{field} must be a whole number"
    if not low <= value <= high:
        return f"{field} must be between {low} and {high}, got {value}"
    return None
