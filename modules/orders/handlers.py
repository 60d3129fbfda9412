"""One function per orders command and subscribed event."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from app.db import Database
from app.mediator import Mediator
from app.messages import CommandRejected
from app.uow import UnitOfWork
from app.wiring import BatchItem
from modules.inventory.commands import ReserveStock, StockLine
from modules.orders import idempotency
from modules.orders.aggregate import Order
from modules.orders.commands import OrderAccepted, PlaceOrder


async def place_order(cmd: PlaceOrder, uow: UnitOfWork, mediator: Mediator, db: Database) -> OrderAccepted:
    order_id = uuid.uuid4()
    key = cmd.idempotency_key
    if key is not None and (earlier := await idempotency.claim(db, cmd, order_id)) is not None:
        return earlier
    try:
        # Synchronous on purpose: the client learns now whether the stock is there.
        await mediator.send(
            ReserveStock(
                order_id=order_id,
                lines=tuple(StockLine(sku=line.sku, quantity=line.quantity) for line in cmd.lines),
            )
        )
        placed_at = datetime.now(UTC)
        async with uow:
            lines = [(line.sku, line.quantity) for line in cmd.lines]
            uow.add(Order.place(order_id, cmd.customer_id, lines, cmd.payment_method, placed_at))
            await uow.commit()
    except CommandRejected as error:
        if key is not None:
            await idempotency.remember_rejection(db, key, error)
        raise
    except BaseException:
        if key is not None:
            await asyncio.shield(idempotency.release(db, key, order_id))
        raise
    return OrderAccepted(order_id=order_id, position=uow.positions[-1], placed_at=placed_at)


# Batch subscriptions (app/wiring.Subscription): a relay run's orders are loaded in one SELECT,
# and each is marked under its payment event's context, so its event carries that event's ids.
async def mark_orders_paid(items: list[BatchItem], uow: UnitOfWork) -> None:
    await _mark_each(items, uow, lambda order, event: order.mark_paid())


async def mark_orders_payment_declined(items: list[BatchItem], uow: UnitOfWork) -> None:
    await _mark_each(items, uow, lambda order, event: order.mark_payment_declined(event.reason))


async def mark_orders_payment_failed(items: list[BatchItem], uow: UnitOfWork) -> None:
    await _mark_each(items, uow, lambda order, event: order.mark_payment_failed(event.reason))


async def _mark_each(items: list[BatchItem], uow: UnitOfWork, mark: Callable[[Order, Any], None]) -> None:
    async with uow:
        orders = await uow.get_many(Order, [item.event.order_id for item in items])
        for item, order in zip(items, orders, strict=True):
            with item.recording():
                mark(order, item.event)
                await uow.commit()
