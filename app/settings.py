"""Configuration from the environment: one frozen dataclass, read once."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path


def _float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None  # None: start the embedded PostgreSQL in data_dir
    data_dir: Path = Path(".switchboard")
    instance_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    modules: tuple[str, ...] | None = None  # None: host every module
    admin_token: str | None = None  # None: the admin API is off
    internal_token: str | None = None  # None: no module can be called from another process
    base_url: str | None = None  # where other instances reach this one (registered in `services`)
    heartbeat_seconds: float = 2.0
    db_pool_size: int = 20
    max_body_bytes: int = 1_048_576
    # mediator
    default_timeout: float = 5.0
    breaker_fail_max: int = 5
    breaker_reset_seconds: float = 30.0
    bulkhead_limit: int = 200
    conflict_retries: int = 30
    # relay
    relay_batch_size: int = 200
    relay_poll_seconds: float = 0.5
    relay_lease_seconds: float = 30.0
    relay_handler_timeout: float = 10.0
    # While commands or queries are running, the relay delivers one group at a time, for rows
    # younger than this (seconds): the synchronous path keeps the CPU, the async side catches up
    # when it is quiet. Older rows go at full speed whatever the load. 0: never yield.
    relay_yield_seconds: float = 30.0
    # After a wake-up, the relay waits this long (seconds) before it claims, so the rows that
    # commit meanwhile go in the same claim and the same delivery transactions: at moderate rates
    # it would otherwise claim each commit's rows alone. It adds at most this much lag. 0: none.
    relay_linger_seconds: float = 0.01
    outbox_retention_seconds: float = 3600.0  # delivered rows stay visible in `outbox` this long
    retry_base_seconds: float = 0.5
    retry_cap_seconds: float = 60.0
    retry_max_attempts: int = 8
    # inventory: reservations no OrderPlaced confirmed are released after this long
    reservation_ttl_seconds: float = 60.0

    @classmethod
    def from_env(cls) -> Settings:
        modules = os.environ.get("SWITCHBOARD_MODULES")
        return cls(
            database_url=os.environ.get("DATABASE_URL") or None,
            data_dir=Path(os.environ.get("SWITCHBOARD_DATA_DIR", ".switchboard")),
            modules=tuple(m.strip() for m in modules.split(",") if m.strip()) if modules else None,
            admin_token=os.environ.get("SWITCHBOARD_ADMIN_TOKEN") or None,
            internal_token=os.environ.get("SWITCHBOARD_INTERNAL_TOKEN") or None,
            base_url=os.environ.get("SWITCHBOARD_BASE_URL") or None,
            heartbeat_seconds=_float("SWITCHBOARD_HEARTBEAT", 2.0),
            db_pool_size=_int("SWITCHBOARD_DB_POOL_SIZE", 20),
            default_timeout=_float("SWITCHBOARD_TIMEOUT", 5.0),
            breaker_fail_max=_int("SWITCHBOARD_BREAKER_FAIL_MAX", 5),
            breaker_reset_seconds=_float("SWITCHBOARD_BREAKER_RESET", 30.0),
            bulkhead_limit=_int("SWITCHBOARD_BULKHEAD", 200),
            relay_batch_size=_int("SWITCHBOARD_RELAY_BATCH", 200),
            relay_poll_seconds=_float("SWITCHBOARD_RELAY_POLL", 0.5),
            relay_lease_seconds=_float("SWITCHBOARD_RELAY_LEASE", 30.0),
            relay_yield_seconds=_float("SWITCHBOARD_RELAY_YIELD", 30.0),
            relay_linger_seconds=_float("SWITCHBOARD_RELAY_LINGER", 0.01),
            outbox_retention_seconds=_float("SWITCHBOARD_OUTBOX_RETENTION", 3600.0),
            retry_base_seconds=_float("SWITCHBOARD_RETRY_BASE", 0.5),
            retry_cap_seconds=_float("SWITCHBOARD_RETRY_CAP", 60.0),
            retry_max_attempts=_int("SWITCHBOARD_RETRY_MAX_ATTEMPTS", 8),
            reservation_ttl_seconds=_float("SWITCHBOARD_RESERVATION_TTL", 60.0),
        )


@cache
def get_settings() -> Settings:
    return Settings.from_env()
