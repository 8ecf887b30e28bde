"""Applying refund events to the read model: one row per refund, latest state wins."""

from __future__ import annotations

from sqlalchemy.orm import Session

from shared.models import Outcome, Refund
from shared.schemas import RefundEvent
from workers.handlers.base import Delivery, Handler
from workers.handlers.snapshot import apply_snapshot


def apply_refund_event(session: Session, event: RefundEvent, delivery: Delivery) -> Outcome:
    refund = event.data
    return apply_snapshot(
        session,
        Refund,
        {"refund_id": refund.refund_id},
        {
            "payment_id": refund.payment_id,
            "status": refund.status,
            "amount": refund.amount,
            "currency": refund.currency,
        },
        event_type=event.type,
        delivered=refund.delivered,
        delivery=delivery,
    )


ROUTES: dict[str, Handler] = {
    "refund.succeeded": apply_refund_event,
    "refund.failed": apply_refund_event,
}
