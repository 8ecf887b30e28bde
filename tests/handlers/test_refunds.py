"""Refunds: one row per refund holding the state of the event that occurred last."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session, sessionmaker

from shared.models import Outcome, Refund
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


class TestApplyRefundEvent:
    def test_first_event_creates_the_refund(self, factory: sessionmaker[Session]) -> None:
        event, delivery = make_event(
            "refund.succeeded", refund_id="ref_1", payment_id="pay_1", amount=700, currency="USD"
        )
        assert apply(factory, event, delivery) is Outcome.APPLIED
        with factory() as session:
            refund = session.get(Refund, "ref_1")
            assert refund is not None
            assert (refund.payment_id, refund.status, refund.amount, refund.currency) == (
                "pay_1",
                "succeeded",
                700,
                "USD",
            )
            assert refund.data["is_partial"] is False

    def test_older_event_does_not_overwrite_newer_state(
        self, factory: sessionmaker[Session]
    ) -> None:
        apply(factory, *make_event("refund.failed", when=at(30), refund_id="ref_1"))
        late = make_event("refund.succeeded", when=at(0), refund_id="ref_1")
        assert apply(factory, *late) is Outcome.SUPERSEDED
        with factory() as session:
            refund = session.get(Refund, "ref_1")
            assert refund is not None
            assert refund.status == "failed"

    def test_same_delivery_applied_twice_leaves_one_row_with_its_state(
        self, factory: sessionmaker[Session]
    ) -> None:
        event, delivery = make_event("refund.succeeded", refund_id="ref_1")
        apply(factory, event, delivery)
        assert apply(factory, event, delivery) is Outcome.APPLIED
        assert count(factory, Refund) == 1

    def test_missing_payment_id_fails_validation_before_any_write(
        self, factory: sessionmaker[Session]
    ) -> None:
        body = make_body("refund.succeeded", refund_id="ref_1")
        del body["data"]["payment_id"]
        with pytest.raises(EventValidationError, match="payment_id"):
            apply_body(factory, body, delivery_for("msg_bad"))
        assert count(factory, Refund) == 0


class TestRollback:
    def test_a_failure_after_the_handler_wrote_leaves_nothing_behind(
        self, factory: sessionmaker[Session]
    ) -> None:
        """The handler never commits: what it wrote goes when the transaction fails later."""
        event, delivery = make_event("refund.succeeded", refund_id="ref_1")
        assert apply_then_fail(factory, event, delivery, Refund) == [1]
        assert count(factory, Refund) == 0
