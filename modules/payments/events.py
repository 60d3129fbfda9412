"""Facts the payments module records; other modules may react to them."""

from uuid import UUID

from app.messages import Event


class PaymentCaptured(Event, tag="payments.PaymentCaptured"):
    """The provider took the money for the order."""

    order_id: UUID
    payment_method: str
    provider_reference: str


class PaymentDeclined(Event, tag="payments.PaymentDeclined"):
    """The provider refused the payment method: a business outcome, not a failure to retry."""

    order_id: UUID
    payment_method: str
    reason: str


class PaymentFailed(Event, tag="payments.PaymentFailed"):
    """The charge could not be made however often it was tried (it ended in the dead letters):
    nothing was taken, and the order will not be paid."""

    order_id: UUID
    payment_method: str
    reason: str
