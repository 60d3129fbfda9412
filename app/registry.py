"""Service registry: every serving process registers (instance, modules, endpoint) in `services`,
heartbeats, and deregisters on graceful shutdown. Instances that miss three heartbeats are gone:
discovery ignores them and the next heartbeat of any instance prunes them."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Sequence

from app.db import Database

log = logging.getLogger(__name__)

VERSION = "0.1.0"
STALE_AFTER_BEATS = 3

REGISTER_SQL = """
INSERT INTO services (instance_id, modules, base_url, version, started_at, heartbeat_at)
VALUES ($1, $2, $3, $4, now(), now())
ON CONFLICT (instance_id) DO UPDATE
SET modules = excluded.modules, base_url = excluded.base_url, version = excluded.version, heartbeat_at = now()
"""

HEARTBEAT_SQL = """
WITH beat AS (
    UPDATE services SET heartbeat_at = now() WHERE instance_id = $1 RETURNING 1
), pruned AS (
    DELETE FROM services WHERE heartbeat_at < now() - make_interval(secs => $2) AND instance_id <> $1
)
SELECT count(*) FROM beat
"""

LIVE_SQL = """
SELECT instance_id, base_url FROM services
WHERE $1 = ANY(modules) AND base_url IS NOT NULL AND instance_id <> $3
  AND heartbeat_at >= now() - make_interval(secs => $2)
ORDER BY instance_id
"""

# What `switchboard services` and operators see: every row, with whether discovery still counts it.
SERVICES_SQL = """
SELECT instance_id, modules, base_url, version, started_at, heartbeat_at,
       extract(epoch FROM now() - heartbeat_at)::float8 AS heartbeat_age_seconds,
       heartbeat_at >= now() - make_interval(secs => $1) AS live
FROM services ORDER BY instance_id
"""


async def list_services(db: Database, stale_seconds: float, *, include_stale: bool = False) -> list[dict]:
    """Registered instances. Without `include_stale`, only those discovery would still call: one
    that missed `STALE_AFTER_BEATS` heartbeats is gone as soon as it is stale, not only once a live
    instance's next heartbeat has pruned its row (up to one interval later)."""
    rows = [dict(r) for r in await db.fetch(SERVICES_SQL, stale_seconds)]
    return rows if include_stale else [r for r in rows if r["live"]]


class Registry:
    def __init__(
        self,
        db: Database,
        *,
        instance_id: str,
        modules: Sequence[str],
        base_url: str | None,
        interval: float = 2.0,
    ) -> None:
        self.db = db
        self.instance_id = instance_id
        self.modules = sorted(modules)
        self.base_url = base_url
        self.interval = interval
        self._task: asyncio.Task | None = None
        self._cache: dict[str, tuple[float, list[tuple[str, str]]]] = {}
        self._turn = itertools.count()

    @property
    def stale_seconds(self) -> float:
        return self.interval * STALE_AFTER_BEATS

    async def register(self) -> None:
        await self.db.execute(REGISTER_SQL, self.instance_id, self.modules, self.base_url, VERSION)

    async def heartbeat(self) -> None:
        beat = await self.db.fetchval(HEARTBEAT_SQL, self.instance_id, self.stale_seconds)
        if not beat:  # pruned while we were paused (e.g. a long GC or a database outage): come back
            await self.register()

    def start(self) -> None:
        self._task = asyncio.create_task(self._beat(), name=f"registry {self.instance_id}")

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.heartbeat()
            except Exception as error:  # the database may be down: keep beating
                log.warning("registry heartbeat failed: %s", error)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self.db.execute("DELETE FROM services WHERE instance_id = $1", self.instance_id)

    async def endpoints(self, module: str) -> list[tuple[str, str]]:
        """Live (instance_id, base_url) hosting `module`, cached for half a heartbeat interval."""
        now = time.monotonic()
        cached = self._cache.get(module)
        if cached and now - cached[0] < self.interval / 2:
            return cached[1]
        rows = await self.db.fetch(LIVE_SQL, module, self.stale_seconds, self.instance_id)
        found = [(r["instance_id"], r["base_url"]) for r in rows]
        self._cache[module] = (now, found)
        return found

    def forget(self, module: str) -> None:
        self._cache.pop(module, None)

    def rotation(self, endpoints: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The endpoints starting at the next one in turn: calls spread across instances."""
        if not endpoints:
            return []
        start = next(self._turn) % len(endpoints)
        return endpoints[start:] + endpoints[:start]
