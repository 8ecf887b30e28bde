"""Applying payment events to the read model: one row per payment, latest state wins."""

from __future__ import annotations

from sqlalchemy.orm import Session

from shared.models import Outcome, Payment
from workers.handlers.base import Delivery
from workers.handlers.snapshot import apply_snapshot
from workers.schemas import PaymentEvent


def apply_payment_event(session: Session, event: PaymentEvent, delivery: Delivery) -> Outcome:
    return apply_snapshot(session, Payment, event, delivery)
