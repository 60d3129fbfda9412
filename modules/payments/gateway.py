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


class CardProcessingError(Exception):
    """The provider failed on this card; says nothing about the provider's health."""


class PaymentProvider(Protocol):
    async def charge(
        self, order_id: UUID, payment_method: str, idempotency_key: str, attempt: int = 1
    ) -> ChargeResult: ...


# Provider outages open the breaker; card-level errors do not.
breaker = aiobreaker.CircuitBreaker(
    fail_max=5, timeout_duration=timedelta(seconds=30), exclude=[CardProcessingError], name="payment-provider"
)


class FakePaymentProvider:
    """pm_card_ok captures; pm_card_declined declines; pm_card_flaky errors on the first two
    attempts for an order, then captures; pm_card_broken always errors. Others decline.

    "Attempt" is the caller's delivery attempt: replicas share no memory, and a fake that counted
    calls per process would need up to 2 failures per replica before the card went through."""

    def __init__(self) -> None:
        self.calls: Counter[UUID] = Counter()  # per process, for tests that count provider calls

    @breaker
    async def charge(
        self, order_id: UUID, payment_method: str, idempotency_key: str, attempt: int = 1
    ) -> ChargeResult:
        self.calls[order_id] += 1
        match payment_method:
            case "pm_card_ok":
                return ChargeResult(captured=True, reference=f"ch_{idempotency_key}")
            case "pm_card_declined":
                return ChargeResult(captured=False, reason="card declined")
            case "pm_card_flaky" if attempt <= 2:
                raise CardProcessingError(f"processor timeout (attempt {attempt}), try again")
            case "pm_card_flaky":
                return ChargeResult(captured=True, reference=f"ch_{idempotency_key}")
            case "pm_card_broken":
                raise CardProcessingError("processor error: this card always fails")
            case _:
                return ChargeResult(captured=False, reason=f"unknown payment method {payment_method!r}")


fake_provider = FakePaymentProvider()  # one per process: its attempt counts are in memory
