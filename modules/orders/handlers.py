"""One function per orders command and subscribed event."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

from app.db import Database
from app.mediator import Mediator
from app.messages import CommandRejected
from app.uow import UnitOfWork
from modules.inventory.commands import ReserveStock, StockLine
from modules.orders import idempotency
from modules.orders.aggregate import Order
from modules.orders.commands import OrderAccepted, PlaceOrder
from modules.payments.events import PaymentCaptured, PaymentDeclined, PaymentFailed


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


async def mark_order_paid(event: PaymentCaptured, uow: UnitOfWork) -> None:
    async with uow:
        order = await uow.get(Order, event.order_id)
        order.mark_paid()
        await uow.commit()


async def mark_order_payment_declined(event: PaymentDeclined, uow: UnitOfWork) -> None:
    async with uow:
        order = await uow.get(Order, event.order_id)
        order.mark_payment_declined(event.reason)
        await uow.commit()


async def mark_order_payment_failed(event: PaymentFailed, uow: UnitOfWork) -> None:
    async with uow:
        order = await uow.get(Order, event.order_id)
        order.mark_payment_failed(event.reason)
        await uow.commit()
