"""Outbox -> JetStream: the rows of the pseudo-subscriber `broker.publish` (one per event whose
subscribers live behind another database) are claimed, published and acknowledged with the
relay's own parts -- claims and leases (app/relay/claims.py), the acknowledgement (ack.py), retries
and dead letters (settle.py) -- so only the delivery differs: a publish instead of a handler.

A row is marked delivered only after JetStream acknowledged its publish (stored on a quorum of
the stream's replicas). A crash between the two leaves the row pending; its next publish carries
the same `Nats-Msg-Id` (the event id), which JetStream drops as a duplicate within the stream's
duplicate window. One row per key per claim (the claim holds a key's later rows back until the
earlier one is delivered), so a batch publishes concurrently without reordering any key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from app.broker.routes import PUBLISHER
from app.broker.stream import PARTITIONS, STREAM, SUBJECTS, headers_of, subject
from app.relay.ack import acknowledge
from app.relay.claims import Batch, Claims, until_idle
from app.relay.policy import RetryPolicies
from app.relay.rows import decode_headers
from app.relay.settle import Outcome, settle

if TYPE_CHECKING:
    from app.bootstrap import System

log = logging.getLogger("app.broker")

NO_RESPONDERS_PAUSE = 0.05  # between publishes the stream did not answer yet (see _publish)

# The claim returns no partition key (the relay's handlers do not need it): read it for the batch.
KEYS_SQL = "SELECT id, partition_key FROM outbox WHERE id = ANY($1::bigint[])"
# A publish that failed because the broker is away (no connection, no stream leader, no answer)
# is not the row's failure: handed back without spending an attempt, due again after a pause
# that grows while the broker stays away. An outage of any length ends in a publish, never in a
# dead letter; the outbox gauges and SwitchboardBrokerDisconnected show it meanwhile.
AWAY_SQL = """
UPDATE outbox SET locked_by = NULL, locked_until = NULL, attempts = greatest(attempts - 1, 0),
                  available_at = now() + make_interval(secs => $3), last_error = $4
WHERE id = ANY($1::bigint[]) AND locked_by = $2 AND status = 'pending'
"""
AWAY_PAUSE = (0.5, 5.0)  # seconds: the first pause, doubled per batch that found the broker away, up to the second


def broker_away(error: BaseException) -> bool:
    """Whether a publish failed for the broker's sake (retry, free) or the message's (an attempt)."""
    import nats.errors
    from nats.js.errors import APIError, ServiceUnavailableError

    if isinstance(error, ServiceUnavailableError):  # the stream has no leader right now
        return True
    if isinstance(error, (APIError, nats.errors.MaxPayloadError)):  # refused: this message
        return False
    return isinstance(error, (nats.errors.Error, TimeoutError, OSError))


class Publisher:
    """Publishes `broker.publish` rows of this database's outbox to the stream."""

    def __init__(
        self,
        system: System,
        js,
        *,
        instance_id: str | None = None,
        partitions: int = PARTITIONS,
        prefix: str = SUBJECTS,
        stream: str = STREAM,
        publish_timeout: float = 5.0,
    ) -> None:
        settings = system.settings
        self.system, self.db, self.js = system, system.db, js
        self.instance_id = instance_id or f"{settings.instance_id}-publisher"
        self.partitions, self.prefix, self.stream = partitions, prefix, stream
        self.publish_timeout = publish_timeout
        self.poll_seconds = settings.relay_poll_seconds
        self.batch_size = settings.relay_batch_size
        self._delete = settings.outbox_retention_seconds <= 0  # as the relay acknowledges
        self._claims = Claims(
            self.db, self.instance_id, [PUBLISHER], self.batch_size, settings.relay_lease_seconds
        )
        self._policies = RetryPolicies(system.subscriptions, settings)
        self._wake = asyncio.Event()
        self._unsubscribe = system.db.on_outbox_written(self._wake.set)
        self._stopping = False
        self._task: asyncio.Task | None = None
        self._pause = AWAY_PAUSE[0]
        self.published = 0

    def start(self) -> asyncio.Task:
        self._task = asyncio.create_task(self._run(), name=f"publisher {self.instance_id}")
        return self._task

    async def stop(self) -> None:
        """Finish the batch in hand (its rows are published and acknowledged, or handed back)."""
        self._stopping = True
        self._unsubscribe()
        self._wake.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while not self._stopping:
            claimed = 0
            try:
                claimed = await self.run_once()
            except Exception as error:  # the database or the broker: try again after the poll
                log.warning("publisher %s: %s, retrying", self.instance_id, error)
            if claimed < self.batch_size and not self._stopping:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
                self._wake.clear()

    async def drain(self, timeout: float = 30.0) -> int:
        """Publish until nothing is due (rows waiting for a later retry stay). For tests and tools."""
        return await until_idle(self.run_once, timeout)

    async def run_once(self) -> int:
        """Claim a batch, publish it, acknowledge what JetStream acknowledged, settle the rest."""
        batch = await self._claims.claim()
        if batch is None:
            return 0
        try:
            await self._publish_batch(batch)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._claims.release(batch))
            raise
        finally:
            batch.keeper.cancel()
        return len(batch.rows)

    async def _publish_batch(self, batch: Batch) -> None:
        keys = {r["id"]: r["partition_key"] for r in await self.db.fetch(KEYS_SQL, batch.ids)}
        rows = [dict(row, partition_key=keys[row["id"]]) for row in batch.rows]
        results = await asyncio.gather(*map(self._publish, rows), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result  # cancelled: the batch goes back unsettled
        done = [row["id"] for row, result in zip(rows, results, strict=True) if result is None]
        if done:
            async with self.db.acquire() as conn, conn.transaction():
                self.published += await self.acknowledge(conn, done)
            self._pause = AWAY_PAUSE[0]
        away = [(row, result) for row, result in zip(rows, results, strict=True) if result is not None and broker_away(result)]
        if away:
            error = away[0][1]
            log.warning("publisher %s: broker away (%s: %s): %d rows wait %.1fs, attempts not spent", self.instance_id,
                        type(error).__name__, error, len(away), self._pause)  # fmt: skip
            await self.db.execute(AWAY_SQL, [row["id"] for row, _ in away], self.instance_id, self._pause,
                                  f"broker away: {type(error).__name__}: {error}"[:2000])  # fmt: skip
            self._pause = min(2 * self._pause, AWAY_PAUSE[1])
        failed = {row["id"] for row, _ in away}
        outcomes = [Outcome(row, result) for row, result in zip(rows, results, strict=True) if row["id"] not in failed]
        await settle(self.system, outcomes, self._policies, self.instance_id)

    def acknowledge(self, conn, ids: list[int]):
        """The outbox acknowledgement, after JetStream's: the seam where a test crashes between them."""
        return acknowledge(conn, ids, self.instance_id, delete=self._delete)

    async def _publish(self, row: dict) -> None:
        """Publish within publish_timeout. "No responders" is answered at once while the stream's
        leader is being elected or its interest has not yet reached the node this client uses
        (a new stream, a lost node): tried again until the timeout rather than spending an attempt."""
        from nats.js.errors import NoStreamResponseError

        headers = headers_of(row, decode_headers(row["headers"]))
        payload = row["payload"].encode() if isinstance(row["payload"], str) else bytes(row["payload"])
        to = subject(row["partition_key"], row["type"], self.partitions, self.prefix)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.publish_timeout
        while True:
            try:
                await self.js.publish(
                    to, payload, timeout=max(0.1, deadline - loop.time()), stream=self.stream, headers=headers
                )
                return
            except NoStreamResponseError:
                if loop.time() + NO_RESPONDERS_PAUSE >= deadline:
                    raise
                await asyncio.sleep(NO_RESPONDERS_PAUSE)
