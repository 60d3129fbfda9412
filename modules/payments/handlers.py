"""Payments reacts to OrderPlaced by charging the order's payment method once, and settles the
payment as failed when that charge ends in the dead letters."""

from __future__ import annotations

from app.uow import UnitOfWork
from app.wiring import Envelope
from modules.orders.events import OrderPlaced
from modules.payments.aggregate import Payment
from modules.payments.gateway import PaymentProvider


async def charge_order(
    event: OrderPlaced, uow: UnitOfWork, envelope: Envelope, payment_gateway: PaymentProvider
) -> None:
    async with uow:
        payment = await uow.find(Payment, event.order_id) or Payment(event.order_id)
        if payment.settled:  # a redelivery after the charge was recorded
            return
        # The order id is the provider's idempotency key: a retried charge is not a second charge.
        result = await payment_gateway.charge(
            event.order_id, event.payment_method, str(event.order_id), attempt=envelope.attempt
        )
        if result.captured:
            payment.capture(event.payment_method, result.reference)
        else:
            payment.decline(event.payment_method, result.reason)
        uow.add(payment)
        await uow.commit()


async def fail_payment(event: OrderPlaced, uow: UnitOfWork, error: str) -> None:
    """charge_order's on_dead_letter: runs in the transaction that parks the charge, so the order
    ends (PaymentFailed releases its stock and fails it) instead of waiting for an operator."""
    async with uow:
        payment = await uow.find(Payment, event.order_id) or Payment(event.order_id)
        payment.fail(event.payment_method, error)
        uow.add(payment)
        await uow.commit()
