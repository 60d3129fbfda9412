"""What a claimed outbox row means to a handler: its event, its envelope, and the correlation
context its effects inherit. One reading for a delivery and for a compensation."""

from __future__ import annotations

from typing import Any

import msgspec

from app import context
from app.eventstore import EventCatalog
from app.messages import Event
from app.wiring import BatchItem, Envelope

decode_headers = msgspec.json.Decoder(dict[str, Any]).decode


def open_row(catalog: EventCatalog, row) -> tuple[Event, Envelope, dict[str, Any]]:
    """Decode the row's event and headers, and make its correlation id (and the message itself,
    as causation) the context of whatever the handler records."""
    event = catalog.decode(row["type"], row["payload"])
    headers = decode_headers(row["headers"])
    context.correlation_id.set(headers.get("correlation_id"))
    context.causation_id.set(str(row["message_id"]))
    envelope = Envelope(
        message_id=row["message_id"],
        position=row["position"],
        subscriber=row["subscriber"],
        attempt=row["attempts"],
        headers=headers,
    )
    return event, envelope, headers


async def call_one(bound, event: Event, envelope: Envelope, uow) -> None:
    """Run one delivery's handler: a batch subscription's with a one-item batch."""
    if bound.subscription.batch:
        await bound.handler([BatchItem(event, envelope)], uow=uow, envelope=envelope)
    else:
        await bound.handler(event, uow=uow, envelope=envelope)
