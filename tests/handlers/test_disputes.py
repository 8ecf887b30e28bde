"""Disputes: the latest state, plus one history row per distinct event whatever the order."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared.models import Dispute, DisputeHistory, Outcome
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


def history(factory: sessionmaker[Session], dispute_id: str) -> list[tuple[str, str]]:
    with factory() as session:
        rows = session.scalars(
            select(DisputeHistory)
            .where(DisputeHistory.dispute_id == dispute_id)
            .order_by(DisputeHistory.event_at, DisputeHistory.webhook_ts)
        )
        return [(row.type, row.dispute_status) for row in rows]


class TestApplyDisputeEvent:
    def test_opened_event_stores_the_amount_as_an_exact_decimal(
        self, factory: sessionmaker[Session]
    ) -> None:
        event, delivery = make_event(
            "dispute.opened", dispute_id="dis_1", payment_id="pay_1", amount="1234.5678"
        )
        assert apply(factory, event, delivery) is Outcome.APPLIED
        with factory() as session:
            dispute = session.get(Dispute, "dis_1")
            assert dispute is not None
            assert dispute.amount == Decimal("1234.5678")
            assert (dispute.dispute_status, dispute.dispute_stage) == (
                "dispute_opened",
                "pre_dispute",
            )
        assert history(factory, "dis_1") == [("dispute.opened", "dispute_opened")]

    def test_history_keeps_every_status_in_occurrence_order_whatever_the_arrival(
        self, factory: sessionmaker[Session]
    ) -> None:
        opened = make_event("dispute.opened", when=at(0), dispute_id="dis_1")
        challenged = make_event("dispute.challenged", when=at(10), dispute_id="dis_1")
        won = make_event("dispute.won", when=at(20), dispute_id="dis_1", dispute_stage="dispute")
        assert apply(factory, *won) is Outcome.APPLIED
        assert apply(factory, *opened) is Outcome.SUPERSEDED
        assert apply(factory, *challenged) is Outcome.SUPERSEDED
        with factory() as session:
            dispute = session.get(Dispute, "dis_1")
            assert dispute is not None
            assert (dispute.dispute_status, dispute.dispute_stage) == ("dispute_won", "dispute")
        assert history(factory, "dis_1") == [
            ("dispute.opened", "dispute_opened"),
            ("dispute.challenged", "dispute_challenged"),
            ("dispute.won", "dispute_won"),
        ]

    def test_same_delivery_applied_twice_adds_one_history_row(
        self, factory: sessionmaker[Session]
    ) -> None:
        event, delivery = make_event("dispute.opened", dispute_id="dis_1")
        apply(factory, event, delivery)
        assert apply(factory, event, delivery) is Outcome.APPLIED
        assert count(factory, Dispute) == 1
        assert count(factory, DisputeHistory) == 1

    def test_float_amount_fails_validation_before_any_write(
        self, factory: sessionmaker[Session]
    ) -> None:
        body = make_body("dispute.opened", dispute_id="dis_1")
        body["data"]["amount"] = 12.34
        with pytest.raises(EventValidationError, match="amount"):
            apply_body(factory, body, delivery_for("msg_bad"))
        assert count(factory, Dispute) == 0
        assert count(factory, DisputeHistory) == 0


class TestRollback:
    def test_a_failure_after_the_handler_wrote_leaves_nothing_behind(
        self, factory: sessionmaker[Session]
    ) -> None:
        """The handler never commits: what it wrote goes when the transaction fails later."""
        event, delivery = make_event("dispute.opened", dispute_id="dsp_1")
        assert apply_then_fail(factory, event, delivery, Dispute, DisputeHistory) == [1, 1]
        assert count(factory, Dispute) == 0
        assert count(factory, DisputeHistory) == 0
