"""Log lines: structlog, with the stdlib `logging` calls the code makes routed through its
ProcessorFormatter, as JSON lines or for a terminal (SWITCHBOARD_LOG_FORMAT, SWITCHBOARD_LOG_LEVEL).
Each line written while a request or a delivery is handled carries its ids, read when the line is
written from the contextvars the scopes in app/observe.py set."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

import structlog
from opentelemetry import trace

from app import context, observe
from app.settings import Settings, SettingsError

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR, "critical": logging.CRITICAL}  # fmt: skip

_handler: logging.Handler | None = None  # the one installed here, replaced when set up again

def add_context(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """Structlog processor: the ids of the request or delivery being handled, read now from the
    contextvars, plus any `extra={"fields": {...}}` the call passed (those win)."""
    record = event.get("_record")
    fields = getattr(record, "fields", None) if record is not None else None
    if fields:
        for key, value in fields.items():
            event.setdefault(key, value)
    correlation = context.correlation_id.get()
    if correlation is not None:
        event.setdefault("correlation_id", correlation)
        event.setdefault("causation_id", context.causation_id.get())
        scope = context.scope.get()
        event.setdefault("module", scope[0] if scope else None)
        event.setdefault("message", scope[1] if scope else None)
        delivery = context.delivery.get()
        if delivery is not None:
            event.setdefault("subscriber", delivery[0])
            event.setdefault("outbox_id", delivery[1])
            event.setdefault("attempt", delivery[2])
    if observe.TRACING:
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            event.setdefault("trace_id", format(span.trace_id, "032x"))
            event.setdefault("span_id", format(span.span_id, "016x"))
    return event


def setup_logging(settings: Settings, stream: Any = None) -> None:
    """Route every stdlib log record through structlog, as JSON lines or for a terminal. Again in
    the same process: replaces only the handler installed here before."""
    global _handler
    level = LEVELS.get(settings.log_level.strip().lower())
    if level is None:
        raise SettingsError(f"SWITCHBOARD_LOG_LEVEL={settings.log_level!r} is not one of {', '.join(LEVELS)}")
    fmt = settings.log_format.strip().lower()
    if fmt == "auto":
        fmt = "console" if (stream or sys.stderr).isatty() else "json"
    if fmt not in ("json", "console"):
        raise SettingsError(f"SWITCHBOARD_LOG_FORMAT={settings.log_format!r} is not json, console or auto")
    shared = [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        add_context,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        renderer: list = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        # plain tracebacks: rich's would print every frame's locals (tokens, rows) into the log
        tty = (stream or sys.stderr).isatty()
        renderer = [structlog.dev.ConsoleRenderer(colors=tty, exception_formatter=structlog.dev.plain_traceback)]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
    )
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = logging.StreamHandler(stream) if stream is not None else _Stderr()
    _handler.setFormatter(formatter)
    root.addHandler(_handler)
    root.setLevel(level)
    observe.DEBUG = level <= logging.DEBUG


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a line is written (pytest swaps it per test)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr


def fields_of(row: Any, headers: Mapping[str, Any]) -> dict[str, Any]:
    """A relay log line's fields for an outbox row, where no delivery scope is open (settling)."""
    subscriber = row["subscriber"]
    fields = {
        "correlation_id": headers.get("correlation_id"),
        "causation_id": str(row["message_id"]),
        "module": subscriber.partition(".")[0],
        "message": row["type"],
        "subscriber": subscriber,
        "outbox_id": row["id"],
        "attempt": row["attempts"],
    }
    parent = headers.get("traceparent")
    if isinstance(parent, str) and parent.count("-") == 3:
        fields["trace_id"] = parent.split("-")[1]  # the trace of the request that recorded the event
    return fields
