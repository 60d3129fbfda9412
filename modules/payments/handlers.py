"""Payments reacts to OrderPlaced by charging the order's payment method once, and settles the
payment as failed when that charge ends in the dead letters."""

from __future__ import annotations

from app.uow import UnitOfWork
from app.wiring import BatchItem
from modules.orders.events import OrderPlaced
from modules.payments.aggregate import Payment
from modules.payments.gateway import PaymentProvider


async def charge_order(items: list[BatchItem], uow: UnitOfWork, payment_gateway: PaymentProvider) -> None:
    """A batch subscription: the run's payments are loaded in one SELECT, then each order is
    charged and settled under its OrderPlaced's context. A provider error for one order raises:
    the run rolls back and the relay delivers each order alone, so only that one retries; the
    orders charged before it are charged again with the same idempotency key, which the provider
    answers with the first charge's result. Charged one after another, not at once: the orders
    after a failing one are not charged in a run that is rolled back."""
    async with uow:
        payments = await uow.find_many(Payment, [item.event.order_id for item in items])
        for item, payment in zip(items, payments, strict=True):
            event: OrderPlaced = item.event  # type: ignore[assignment]
            payment = payment or Payment(event.order_id)
            if payment.settled:  # a redelivery after the charge was recorded
                continue
            # The order id is the provider's idempotency key: a retried charge is not a second charge.
            result = await payment_gateway.charge(
                event.order_id, event.payment_method, str(event.order_id), attempt=item.envelope.attempt
            )
            with item.recording():
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
