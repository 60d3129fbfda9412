"""The payment provider port and a fake provider whose test cards behave like a card processor's."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Protocol
from uuid import UUID

import aiobreaker
import msgspec


class ChargeResult(msgspec.Struct, frozen=True, kw_only=True):
    captured: bool
    reference: str = ""
    reason: str = ""


class ProviderUnavailable(Exception):
    """The provider could not be reached: counts against the breaker."""


class CardProcessingError(Exception):
    """The provider failed on this card; says nothing about the provider's health."""


class PaymentProvider(Protocol):
    async def charge(self, order_id: UUID, payment_method: str, idempotency_key: str) -> ChargeResult: ...


# Provider outages open the breaker; card-level errors do not.
breaker = aiobreaker.CircuitBreaker(
    fail_max=5, timeout_duration=timedelta(seconds=30), exclude=[CardProcessingError], name="payment-provider"
)


class FakePaymentProvider:
    """pm_card_ok captures; pm_card_declined declines; pm_card_flaky errors on the first two
    attempts for an order, then captures; pm_card_broken always errors. Others decline."""

    def __init__(self) -> None:
        self.attempts: Counter[UUID] = Counter()

    @breaker
    async def charge(self, order_id: UUID, payment_method: str, idempotency_key: str) -> ChargeResult:
        self.attempts[order_id] += 1
        match payment_method:
            case "pm_card_ok":
                return ChargeResult(captured=True, reference=f"ch_{idempotency_key}")
            case "pm_card_declined":
                return ChargeResult(captured=False, reason="card declined")
            case "pm_card_flaky" if self.attempts[order_id] <= 2:
                raise CardProcessingError(f"processor timeout (attempt {self.attempts[order_id]}), try again")
            case "pm_card_flaky":
                return ChargeResult(captured=True, reference=f"ch_{idempotency_key}")
            case "pm_card_broken":
                raise CardProcessingError("processor error: this card always fails")
            case _:
                return ChargeResult(captured=False, reason=f"unknown payment method {payment_method!r}")


fake_provider = FakePaymentProvider()  # one per process: its attempt counts are in memory
