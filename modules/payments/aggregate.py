"""Payment of one order: charged once, captured or declined -- or failed, when charging it never
worked (the charge was dead-lettered)."""

from __future__ import annotations

from uuid import UUID

from app.aggregate import Aggregate
from app.messages import Event
from modules.payments.events import PaymentCaptured, PaymentDeclined, PaymentFailed


class Payment(Aggregate):
    stream_type = "payment"

    def __init__(self, id: UUID) -> None:
        super().__init__(id)
        self.status = "new"

    @property
    def settled(self) -> bool:
        return self.status != "new"

    def capture(self, payment_method: str, reference: str) -> None:
        if not self.settled:
            self._record(PaymentCaptured(order_id=self.id, payment_method=payment_method, provider_reference=reference))

    def decline(self, payment_method: str, reason: str) -> None:
        if not self.settled:
            self._record(PaymentDeclined(order_id=self.id, payment_method=payment_method, reason=reason))

    def fail(self, payment_method: str, reason: str) -> None:
        """Settle it as failed: a later charge of the same order (a replayed delivery) finds it
        settled and charges nothing."""
        if not self.settled:
            self._record(PaymentFailed(order_id=self.id, payment_method=payment_method, reason=reason))

    def _apply(self, event: Event) -> None:
        match event:
            case PaymentCaptured():
                self.status = "captured"
            case PaymentDeclined():
                self.status = "declined"
            case PaymentFailed():
                self.status = "failed"
