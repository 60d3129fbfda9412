"""One retry policy per subscription: its own values where it sets them, the settings' defaults
where not, resolved in one place for the relay's give-up check and its settling."""

from __future__ import annotations

from app.relay.policy import RetryPolicies, RetryPolicy, retry_policy
from app.settings import Settings
from app.wiring import Subscription

DEFAULTS = Settings(retry_max_attempts=8, retry_base_seconds=0.5, retry_cap_seconds=60.0)


async def handle(event) -> None: ...


class Bound:
    def __init__(self, subscription: Subscription) -> None:
        self.subscription = subscription


def test_a_subscription_without_overrides_gets_the_settings_defaults():
    assert retry_policy(Subscription("orders.confirm_order", handle), DEFAULTS) == RetryPolicy(8, 0.5, 60.0)


def test_a_subscriptions_overrides_win_over_the_defaults_one_by_one():
    sub = Subscription("orders.confirm_order", handle, max_attempts=3, retry_cap_seconds=5.0)

    assert retry_policy(sub, DEFAULTS) == RetryPolicy(3, 0.5, 5.0)


def test_a_subscriber_that_is_not_known_here_gets_the_defaults():
    policies = RetryPolicies({}, DEFAULTS)

    assert policies["elsewhere.handler"] == RetryPolicy(8, 0.5, 60.0)


def test_policies_are_resolved_once_per_subscriber_by_name():
    bound = Bound(Subscription("payments.capture", handle, max_attempts=2, retry_base_seconds=1.0))
    policies = RetryPolicies({"payments.capture": bound}, DEFAULTS)

    first = policies["payments.capture"]
    bound.subscription = Subscription("payments.capture", handle, max_attempts=99)

    assert first == RetryPolicy(2, 1.0, 60.0)
    assert policies["payments.capture"] is first


def test_the_last_allowed_attempt_exhausts_the_policy():
    policy = RetryPolicy(3, 0.5, 60.0)

    assert [policy.exhausted(n) for n in (1, 2, 3, 4)] == [False, False, True, True]


def test_the_delay_is_full_jitter_under_the_capped_exponential_bound():
    policy = RetryPolicy(8, 0.5, 3.0)

    assert [policy.delay(n, rand=lambda: 1.0) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.delay(4, rand=lambda: 0.0) == 0.0
