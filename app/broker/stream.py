"""The stream layout: one JetStream stream for switchboard's events, one subject per (partition,
event type), and the message headers an outbox row becomes.

Per-key order: a key (the event's stream, the outbox's `partition_key`) always maps to the same
partition, and each remote subscriber reads each partition through a durable consumer that one
consumer at a time pulls, a batch at a time, applying the batch in stream order
(app/broker/consumer.py). A message whose handler fails is not sent back to JetStream but handed
to the consuming database's outbox, and its key's later messages queue behind it there
(app/broker/apply.py): the key's order holds across retries, as the outbox's does. Partitions run
in parallel; keys in one partition share its order.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

STREAM = "SWITCHBOARD_EVENTS"
SUBJECTS = "switchboard.events"
PARTITIONS = 8
# JetStream drops a publish whose Nats-Msg-Id it saw within this window: it must outlast the
# retries of a row whose publish was acknowledged but whose outbox acknowledgement was lost (a
# lease, then backoff). Later duplicates still meet the consumer's inbox.
DUPLICATE_WINDOW_SECONDS = 15 * 60.0
# Limits retention, not interest: a message published before its consumer exists must wait for
# it. Kept this long whether consumed or not, so a consumer that was down can catch up.
MAX_AGE_SECONDS = 7 * 24 * 3600.0

# outbox `headers` (event metadata) key -> NATS header
CONTEXT_HEADERS = {
    "correlation_id": "Switchboard-Correlation-Id",
    "causation_id": "Switchboard-Causation-Id",
    "traceparent": "traceparent",
}
TYPE_HEADER = "Switchboard-Type"
KEY_HEADER = "Switchboard-Partition-Key"
POSITION_HEADER = "Switchboard-Position"
MSG_ID = "Nats-Msg-Id"


def partition_of(key: str, partitions: int = PARTITIONS) -> int:
    """Stable across processes and restarts (crc32, not Python's salted hash)."""
    return zlib.crc32(key.encode()) % partitions


def subject(key: str, topic: str, partitions: int = PARTITIONS, prefix: str = SUBJECTS) -> str:
    """`switchboard.events.<partition>.<module>.<EventType>`: topics are `module.Name`."""
    return f"{prefix}.{partition_of(key, partitions)}.{topic}"


def filters(partition: int, topics: Iterable[str], prefix: str = SUBJECTS) -> list[str]:
    """A consumer's subjects: its subscriber's event types in one partition."""
    return sorted(f"{prefix}.{partition}.{topic}" for topic in topics)


def headers_of(row: Any, metadata: Mapping[str, Any]) -> dict[str, str]:
    """The NATS headers of a claimed outbox row (`metadata`: its decoded `headers` column)."""
    headers = {
        MSG_ID: str(row["message_id"]),
        TYPE_HEADER: row["type"],
        KEY_HEADER: row["partition_key"],
        POSITION_HEADER: str(row["position"]),
    }
    for key, name in CONTEXT_HEADERS.items():
        if metadata.get(key):
            headers[name] = str(metadata[key])
    return headers


def metadata_of(headers: Mapping[str, str]) -> dict[str, str]:
    """The event metadata back from a message's headers (what `open_row` reads)."""
    return {key: headers[name] for key, name in CONTEXT_HEADERS.items() if name in headers}


CLUSTER_REPLICAS = 3  # a quorum survives one node's loss


def cluster_size(nc) -> int:
    """The replicas to give the stream: 1 on a server that is not in a cluster (its INFO names no
    cluster), else at least CLUSTER_REPLICAS, more if more servers are known (JetStream allows up
    to 5). Not the discovered servers alone: a client given one URL may not have heard of every
    peer yet, and processes that counted differently would keep changing the stream's replicas."""
    if not nc._server_info.get("cluster"):  # nats-py keeps the server's INFO only there
        return 1
    return min(5, max(CLUSTER_REPLICAS, len(nc.servers)))


async def ensure_stream(js, replicas: int, *, name: str = STREAM, prefix: str = SUBJECTS):
    """Create the stream, or bring an existing one to this configuration: idempotent, so every
    process may call it at start."""
    from nats.js.api import RetentionPolicy, StorageType, StreamConfig
    from nats.js.errors import BadRequestError

    config = StreamConfig(
        name=name,
        subjects=[f"{prefix}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
        max_age=MAX_AGE_SECONDS,
    )
    try:
        await js.add_stream(config)
    except BadRequestError:  # exists with another configuration
        await js.update_stream(config)
    return await stream_ready(js, name)


async def stream_ready(js, name: str = STREAM, timeout: float = 30.0):
    """The stream's info once its replicas elected a leader: until then a publish finds no
    responder (a replicated stream just created, or a cluster that lost its leader's node)."""
    async with asyncio.timeout(timeout):
        while True:
            info = await js.stream_info(name)
            if info.cluster is None or info.cluster.leader:  # None: a single server, no election
                return info
            await asyncio.sleep(0.05)
