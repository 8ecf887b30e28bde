"""Payments: one row per payment holding the state of the event that occurred last."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session, sessionmaker

from shared.models import Outcome, Payment
from tests.handlers.events import (
    apply,
    apply_body,
    apply_then_fail,
    at,
    count,
    delivery_for,
    make_body,
    make_event,
)
from workers.schemas import EventValidationError


class TestApplyPaymentEvent:
    def test_first_event_creates_the_payment_with_dodo_fields(
        self, factory: sessionmaker[Session]
    ) -> None:
        event, delivery = make_event(
            "payment.succeeded",
            payment_id="pay_1",
            total_amount=4999,
            currency="EUR",
            customer={"customer_id": "cus_9", "email": "a@example.com", "name": "A"},
            subscription_id="sub_3",
            refund_status="partial",
        )
        assert apply(factory, event, delivery) is Outcome.APPLIED
        with factory() as session:
            payment = session.get(Payment, "pay_1")
            assert payment is not None
            assert (payment.status, payment.total_amount, payment.currency) == (
                "succeeded",
                4999,
                "EUR",
            )
            assert (payment.customer_id, payment.subscription_id) == ("cus_9", "sub_3")
            assert payment.refund_status == "partial"
            assert payment.last_event_type == "payment.succeeded"
            assert payment.last_webhook_id == delivery.webhook_id
            assert payment.data["payment_method"] == "card"  # Dodo's object kept whole

    def test_newer_event_replaces_the_state(self, factory: sessionmaker[Session]) -> None:
        apply(factory, *make_event("payment.processing", when=at(0), payment_id="pay_1"))
        outcome = apply(factory, *make_event("payment.failed", when=at(5), payment_id="pay_1"))
        assert outcome is Outcome.APPLIED
        with factory() as session:
            payment = session.get(Payment, "pay_1")
            assert payment is not None
            assert payment.status == "failed"
            assert payment.last_event_type == "payment.failed"

    def test_older_event_does_not_overwrite_newer_state(
        self, factory: sessionmaker[Session]
    ) -> None:
        apply(factory, *make_event("payment.succeeded", when=at(10), payment_id="pay_1"))
        late = make_event("payment.processing", when=at(1), payment_id="pay_1", total_amount=1)
        assert apply(factory, *late) is Outcome.SUPERSEDED
        with factory() as session:
            payment = session.get(Payment, "pay_1")
            assert payment is not None
            assert (payment.status, payment.total_amount) == ("succeeded", 2500)

    def test_same_delivery_applied_twice_changes_nothing(
        self, factory: sessionmaker[Session]
    ) -> None:
        event, delivery = make_event("payment.succeeded", payment_id="pay_1")
        apply(factory, event, delivery)
        with factory() as session:
            before = session.get(Payment, "pay_1")
            assert before is not None
            updated_at = before.updated_at
        assert apply(factory, event, delivery) is Outcome.APPLIED
        assert count(factory, Payment) == 1
        with factory() as session:
            after = session.get(Payment, "pay_1")
            assert after is not None
            assert after.updated_at == updated_at

    def test_ties_on_timestamp_are_broken_by_webhook_timestamp_then_id(
        self, factory: sessionmaker[Session]
    ) -> None:
        same = at(0)
        second = make_event(
            "payment.failed", when=same, webhook_ts=200, webhook_id="msg_a", payment_id="pay_1"
        )
        third = make_event(
            "payment.cancelled", when=same, webhook_ts=200, webhook_id="msg_b", payment_id="pay_1"
        )
        first = make_event(
            "payment.succeeded", when=same, webhook_ts=100, webhook_id="msg_z", payment_id="pay_1"
        )
        assert apply(factory, *third) is Outcome.APPLIED
        assert apply(factory, *second) is Outcome.SUPERSEDED
        assert apply(factory, *first) is Outcome.SUPERSEDED
        with factory() as session:
            payment = session.get(Payment, "pay_1")
            assert payment is not None
            assert payment.status == "cancelled"

    def test_float_amount_fails_validation_before_any_write(
        self, factory: sessionmaker[Session]
    ) -> None:
        body = make_body("payment.succeeded", payment_id="pay_1")
        body["data"]["total_amount"] = 25.5
        with pytest.raises(EventValidationError, match="total_amount"):
            apply_body(factory, body, delivery_for("msg_bad"))
        assert count(factory, Payment) == 0

    def test_nul_in_a_stored_field_fails_validation_before_any_write(
        self, factory: sessionmaker[Session]
    ) -> None:
        body = make_body("payment.succeeded", payment_id="pay_1")
        body["data"]["currency"] = "US\x00D"
        with pytest.raises(EventValidationError, match="NUL"):
            apply_body(factory, body, delivery_for("msg_bad"))
        assert count(factory, Payment) == 0


class TestRollback:
    def test_a_failure_after_the_handler_wrote_leaves_nothing_behind(
        self, factory: sessionmaker[Session]
    ) -> None:
        """The handler never commits: what it wrote goes when the transaction fails later."""
        event, delivery = make_event("payment.succeeded", payment_id="pay_1")
        assert apply_then_fail(factory, event, delivery, Payment) == [1]
        assert count(factory, Payment) == 0
