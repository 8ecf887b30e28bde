"""Applying dispute events: the latest state, and every status the dispute went through."""

from __future__ import annotations

from sqlalchemy.orm import Session

from shared.models import Dispute, Outcome
from workers.handlers.base import Delivery
from workers.handlers.snapshot import apply_snapshot
from workers.schemas import DisputeEvent


def apply_dispute_event(session: Session, event: DisputeEvent, delivery: Delivery) -> Outcome:
    """Kept even when superseded: the history is every status, in occurrence order."""
    return apply_snapshot(session, Dispute, event, delivery)
