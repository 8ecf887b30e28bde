"""The shared snapshot rule under concurrency: two workers, one entity, no lost update."""

from __future__ import annotations

import random
import threading
import time

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared.db import transaction
from shared.models import (
    Dispute,
    DisputeHistory,
    Outcome,
    Payment,
    Subscription,
    SubscriptionHistory,
)
from tests.handlers.events import apply, at, count, make_event
from workers.handlers import ROUTES, Delivery
from workers.schemas import Envelope

ROUNDS = 25


def race(
    factory: sessionmaker[Session], *events: tuple[Envelope, Delivery]
) -> list[Outcome | BaseException]:
    """Apply each event in its own thread and transaction, all released at the same moment.

    Each transaction stays open a random few milliseconds after its handler returns, so the
    other worker often has to wait on the row lock and then see what was committed.
    """
    barrier = threading.Barrier(len(events))
    results: list[Outcome | BaseException] = [RuntimeError("did not finish")] * len(events)

    def work(index: int, event: Envelope, delivery: Delivery) -> None:
        try:
            with transaction(factory) as session:
                barrier.wait(timeout=10)
                outcome = ROUTES[event.type](session, event, delivery)  # type: ignore[attr-defined]
                time.sleep(random.uniform(0, 0.01))
            results[index] = outcome
        except BaseException as exc:
            results[index] = exc

    threads = [threading.Thread(target=work, args=(i, *event)) for i, event in enumerate(events)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive(), "a worker is stuck (deadlock?)"
    return results


class TestConcurrentSnapshots:
    @pytest.mark.parametrize("row_exists", [False, True], ids=["new-row", "existing-row"])
    def test_newer_payment_event_always_wins_a_race(
        self, factory: sessionmaker[Session], row_exists: bool
    ) -> None:
        for round_ in range(ROUNDS):
            payment_id = f"pay_{round_}"
            if row_exists:
                apply(factory, *make_event("payment.processing", when=at(0), payment_id=payment_id))
            older = make_event("payment.failed", when=at(10), payment_id=payment_id)
            newer = make_event("payment.succeeded", when=at(20), payment_id=payment_id)
            pair = [older, newer]
            random.shuffle(pair)
            results = race(factory, *pair)
            assert not [r for r in results if isinstance(r, BaseException)], results
            outcome_of = dict(zip([e[1].webhook_id for e in pair], results, strict=True))
            assert outcome_of[newer[1].webhook_id] is Outcome.APPLIED
            with factory() as session:
                payment = session.get(Payment, payment_id)
                assert payment is not None
                assert (payment.status, payment.last_webhook_id) == (
                    "succeeded",
                    newer[1].webhook_id,
                ), f"round {round_}: lost update"

    def test_racing_dispute_events_keep_the_newest_state_and_all_history(
        self, factory: sessionmaker[Session]
    ) -> None:
        for round_ in range(ROUNDS):
            dispute_id = f"dis_{round_}"
            events = [
                make_event("dispute.opened", when=at(0), dispute_id=dispute_id),
                make_event("dispute.challenged", when=at(10), dispute_id=dispute_id),
                make_event("dispute.won", when=at(20), dispute_id=dispute_id),
            ]
            random.shuffle(events)
            results = race(factory, *events)
            assert not [r for r in results if isinstance(r, BaseException)], results
            with factory() as session:
                dispute = session.get(Dispute, dispute_id)
                assert dispute is not None
                assert dispute.dispute_status == "dispute_won", f"round {round_}: lost update"
        assert count(factory, DisputeHistory) == 3 * ROUNDS


class TestArrivalOrder:
    def test_final_state_does_not_depend_on_arrival_order_or_duplicates(
        self, factory: sessionmaker[Session]
    ) -> None:
        """Any shuffle of a subscription's events, some delivered twice, ends in one state."""
        rng = random.Random(20260301)
        lifecycle = [
            ("subscription.active", 0, {}),
            ("subscription.renewed", 10, {}),
            ("subscription.plan_changed", 20, {"product_id": "pdt_2", "quantity": 4}),
            ("subscription.on_hold", 30, {"product_id": "pdt_2", "quantity": 4}),
            ("subscription.cancelled", 30, {"product_id": "pdt_2", "quantity": 4}),
        ]
        for round_ in range(8):
            subscription_id = f"sub_{round_}"
            events = [
                make_event(t, when=at(s), subscription_id=subscription_id, **data)
                for t, s, data in lifecycle
            ]
            arrivals = events + rng.sample(events, 2)
            rng.shuffle(arrivals)
            for event in arrivals:
                apply(factory, *event)
            # Same timestamp for the last two: the later delivery (larger id) wins the tie.
            last = max(events, key=lambda e: e[1].order_key)
            with factory() as session:
                row = session.get(Subscription, subscription_id)
                assert row is not None
                assert (row.status, row.product_id, row.quantity, row.last_webhook_id) == (
                    "cancelled",
                    "pdt_2",
                    4,
                    last[1].webhook_id,
                ), f"round {round_}"
                history = session.scalars(
                    select(SubscriptionHistory.type)
                    .where(SubscriptionHistory.subscription_id == subscription_id)
                    .order_by(SubscriptionHistory.event_at, SubscriptionHistory.webhook_id)
                ).all()
            assert history == [t for t, _, _ in lifecycle]
