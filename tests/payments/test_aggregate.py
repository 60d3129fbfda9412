"""Payment: given events -> decide -> new events. No database."""

from uuid import UUID

from modules.payments.aggregate import Payment
from modules.payments.events import PaymentCaptured, PaymentDeclined

ORDER_ID = UUID("00000000-0000-0000-0000-0000000000c1")
CAPTURED = PaymentCaptured(order_id=ORDER_ID, payment_method="pm_card_ok", provider_reference="ch_1")
DECLINED = PaymentDeclined(order_id=ORDER_ID, payment_method="pm_card_declined", reason="card declined")


def test_capturing_a_new_payment_records_payment_captured():
    payment = Payment(ORDER_ID)

    payment.capture("pm_card_ok", "ch_1")

    assert payment.collect_events() == [CAPTURED]
    assert payment.settled


def test_capturing_a_captured_payment_again_records_nothing():
    payment = Payment.rehydrate(ORDER_ID, [CAPTURED])

    payment.capture("pm_card_ok", "ch_2")

    assert payment.collect_events() == []


def test_capturing_twice_in_one_unit_records_payment_captured_once():
    payment = Payment(ORDER_ID)

    payment.capture("pm_card_ok", "ch_1")
    payment.capture("pm_card_ok", "ch_1")

    assert payment.collect_events() == [CAPTURED]


def test_declining_a_new_payment_records_payment_declined():
    payment = Payment(ORDER_ID)

    payment.decline("pm_card_declined", "card declined")

    assert payment.collect_events() == [DECLINED]
    assert payment.status == "declined"


def test_a_declined_payment_cannot_be_captured_afterwards():
    payment = Payment.rehydrate(ORDER_ID, [DECLINED])

    payment.capture("pm_card_ok", "ch_1")

    assert payment.collect_events() == []
    assert payment.status == "declined"


def test_a_captured_payment_cannot_be_declined_afterwards():
    payment = Payment.rehydrate(ORDER_ID, [CAPTURED])

    payment.decline("pm_card_ok", "late decline")

    assert payment.collect_events() == []
    assert payment.status == "captured"
