"""Subscriptions: the latest state, and a history row per distinct event."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared.models import Outcome, Subscription, SubscriptionHistory
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


class TestApplySubscriptionEvent:
    def test_active_event_stores_the_subscription(self, factory: sessionmaker[Session]) -> None:
        event, delivery = make_event(
            "subscription.active",
            subscription_id="sub_1",
            product_id="pdt_1",
            quantity=3,
            customer={"customer_id": "cus_1", "email": "a@example.com", "name": "A"},
            next_billing_date="2026-04-01T00:00:00Z",
            previous_billing_date="2026-03-01T00:00:00Z",
            cancelled_at=None,
        )
        assert apply(factory, event, delivery) is Outcome.APPLIED
        with factory() as session:
            row = session.get(Subscription, "sub_1")
            assert row is not None
            assert (row.status, row.product_id, row.quantity, row.customer_id) == (
                "active",
                "pdt_1",
                3,
                "cus_1",
            )
            assert row.next_billing_date is not None
            assert row.next_billing_date.isoformat() == "2026-04-01T00:00:00+00:00"
            assert row.cancel_at_next_billing_date is False
            assert row.cancelled_at is None

    def test_plan_change_then_late_renewal_keeps_the_plan_change(
        self, factory: sessionmaker[Session]
    ) -> None:
        apply(factory, *make_event("subscription.active", when=at(0), subscription_id="sub_1"))
        changed = make_event(
            "subscription.plan_changed", when=at(20), subscription_id="sub_1", product_id="pdt_2"
        )
        renewed = make_event(
            "subscription.renewed", when=at(10), subscription_id="sub_1", product_id="pdt_1"
        )
        assert apply(factory, *changed) is Outcome.APPLIED
        assert apply(factory, *renewed) is Outcome.SUPERSEDED
        with factory() as session:
            row = session.get(Subscription, "sub_1")
            assert row is not None
            assert (row.product_id, row.last_event_type) == ("pdt_2", "subscription.plan_changed")
            steps = session.scalars(
                select(SubscriptionHistory.type).order_by(SubscriptionHistory.event_at)
            ).all()
        assert steps == ["subscription.active", "subscription.renewed", "subscription.plan_changed"]

    def test_cancellation_is_kept_against_an_older_update(
        self, factory: sessionmaker[Session]
    ) -> None:
        cancelled = make_event("subscription.cancelled", when=at(50), subscription_id="sub_1")
        apply(factory, *cancelled)
        stale = make_event("subscription.updated", when=at(40), subscription_id="sub_1")
        assert apply(factory, *stale) is Outcome.SUPERSEDED
        with factory() as session:
            row = session.get(Subscription, "sub_1")
            assert row is not None
            assert row.status == "cancelled"
            assert row.cancelled_at is not None

    def test_paused_event_beyond_the_promised_types_is_applied(
        self, factory: sessionmaker[Session]
    ) -> None:
        assert apply(factory, *make_event("subscription.paused", subscription_id="sub_1")) == (
            Outcome.APPLIED
        )
        with factory() as session:
            row = session.get(Subscription, "sub_1")
            assert row is not None
            assert row.status == "paused"

    def test_same_delivery_applied_twice_adds_one_history_row(
        self, factory: sessionmaker[Session]
    ) -> None:
        event, delivery = make_event("subscription.renewed", subscription_id="sub_1")
        apply(factory, event, delivery)
        assert apply(factory, event, delivery) is Outcome.APPLIED
        assert count(factory, Subscription) == 1
        assert count(factory, SubscriptionHistory) == 1

    def test_string_quantity_fails_validation_before_any_write(
        self, factory: sessionmaker[Session]
    ) -> None:
        body = make_body("subscription.active", subscription_id="sub_1")
        body["data"]["quantity"] = "3"
        with pytest.raises(EventValidationError, match="quantity"):
            apply_body(factory, body, delivery_for("msg_bad"))
        assert count(factory, Subscription) == 0
        assert count(factory, SubscriptionHistory) == 0


class TestRollback:
    def test_a_failure_after_the_handler_wrote_leaves_nothing_behind(
        self, factory: sessionmaker[Session]
    ) -> None:
        """The handler never commits: what it wrote goes when the transaction fails later."""
        event, delivery = make_event("subscription.active", subscription_id="sub_1")
        assert apply_then_fail(factory, event, delivery, Subscription, SubscriptionHistory) == [
            1,
            1,
        ]
        assert count(factory, Subscription) == 0
        assert count(factory, SubscriptionHistory) == 0
