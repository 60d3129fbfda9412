"""One function per orders command and subscribed event."""

from __future__ import annotations

import uuid

from app.mediator import Mediator
from app.uow import UnitOfWork
from modules.inventory.commands import ReserveStock, StockLine
from modules.orders.aggregate import Order
from modules.orders.commands import OrderAccepted, PlaceOrder
from modules.orders.queries import GetOrderPlacement, OrderPlacementView
from modules.payments.events import PaymentCaptured, PaymentDeclined


async def place_order(cmd: PlaceOrder, uow: UnitOfWork, mediator: Mediator) -> OrderAccepted:
    order_id = uuid.uuid4()
    # Synchronous on purpose: the client learns now whether the stock is there.
    await mediator.send(
        ReserveStock(order_id=order_id, lines=tuple(StockLine(sku=line.sku, quantity=line.quantity) for line in cmd.lines))
    )
    async with uow:
        uow.add(Order.place(order_id, cmd.customer_id, [(line.sku, line.quantity) for line in cmd.lines], cmd.payment_method))
        await uow.commit()
    return OrderAccepted(order_id=order_id, position=uow.positions[-1])


async def get_order_placement(query: GetOrderPlacement, uow: UnitOfWork) -> OrderPlacementView:
    async with uow:
        return OrderPlacementView(order_id=query.order_id, placed=await uow.find(Order, query.order_id) is not None)


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
