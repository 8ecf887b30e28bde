"""Applying payment events to the read model: one row per payment, latest state wins."""

from __future__ import annotations

from sqlalchemy.orm import Session

from shared.models import Outcome, Payment
from shared.schemas import PaymentEvent
from workers.handlers.base import Delivery, Handler
from workers.handlers.snapshot import apply_snapshot


def apply_payment_event(session: Session, event: PaymentEvent, delivery: Delivery) -> Outcome:
    payment = event.data
    return apply_snapshot(
        session,
        Payment,
        {"payment_id": payment.payment_id},
        {
            "status": payment.status,
            "total_amount": payment.total_amount,
            "currency": payment.currency,
            "customer_id": payment.customer_id,
            "subscription_id": payment.subscription_id,
            "refund_status": payment.refund_status,
        },
        event_type=event.type,
        delivered=payment.delivered,
        delivery=delivery,
    )


ROUTES: dict[str, Handler] = {
    "payment.succeeded": apply_payment_event,
    "payment.failed": apply_payment_event,
    "payment.processing": apply_payment_event,
    "payment.cancelled": apply_payment_event,
}
