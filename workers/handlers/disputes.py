"""Applying dispute events: the latest state, and every status the dispute went through."""

from __future__ import annotations

from sqlalchemy.orm import Session

from shared.models import Dispute, DisputeHistory, Outcome
from shared.schemas import DisputeEvent
from workers.handlers.base import Delivery, Handler
from workers.handlers.snapshot import apply_snapshot


def apply_dispute_event(session: Session, event: DisputeEvent, delivery: Delivery) -> Outcome:
    dispute = event.data
    return apply_snapshot(
        session,
        Dispute,
        {"dispute_id": dispute.dispute_id},
        {
            "payment_id": dispute.payment_id,
            "dispute_status": dispute.dispute_status,
            "dispute_stage": dispute.dispute_stage,
            "amount": dispute.amount,
            "currency": dispute.currency,
        },
        event_type=event.type,
        delivered=dispute.delivered,
        delivery=delivery,
        # Kept even when superseded: the history is every status, in occurrence order.
        history=(
            DisputeHistory,
            {
                "dispute_id": dispute.dispute_id,
                "webhook_id": delivery.webhook_id,
                "type": event.type,
                "dispute_status": dispute.dispute_status,
                "dispute_stage": dispute.dispute_stage,
                "event_at": delivery.event_at,
                "webhook_ts": delivery.webhook_ts,
            },
        ),
    )


ROUTES: dict[str, Handler] = {
    "dispute.opened": apply_dispute_event,
    "dispute.expired": apply_dispute_event,
    "dispute.accepted": apply_dispute_event,
    "dispute.cancelled": apply_dispute_event,
    "dispute.challenged": apply_dispute_event,
    "dispute.won": apply_dispute_event,
    "dispute.lost": apply_dispute_event,
}
