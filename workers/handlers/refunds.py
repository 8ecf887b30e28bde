"""Applying refund events to the read model: one row per refund, latest state wins."""

from __future__ import annotations

from sqlalchemy.orm import Session

from shared.models import Outcome, Refund
from workers.handlers.base import Delivery
from workers.handlers.snapshot import apply_snapshot
from workers.schemas import RefundEvent


def apply_refund_event(session: Session, event: RefundEvent, delivery: Delivery) -> Outcome:
    return apply_snapshot(session, Refund, event, delivery)
