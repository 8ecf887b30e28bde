"""Applying subscription events: the latest state, and a history of renewals and changes."""

from __future__ import annotations

from sqlalchemy.orm import Session

from shared.models import Outcome, Subscription
from workers.handlers.base import Delivery
from workers.handlers.snapshot import apply_snapshot
from workers.schemas import SubscriptionEvent


def apply_subscription_event(
    session: Session, event: SubscriptionEvent, delivery: Delivery
) -> Outcome:
    """The history keeps every event, superseded ones too, in occurrence order."""
    return apply_snapshot(session, Subscription, event, delivery)
