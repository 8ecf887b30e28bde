"""Applying subscription events: the latest state, and a history of renewals and changes."""

from __future__ import annotations

from sqlalchemy.orm import Session

from shared.models import Outcome, Subscription, SubscriptionHistory
from shared.schemas import SubscriptionEvent
from workers.handlers.base import Delivery, Handler
from workers.handlers.snapshot import apply_snapshot


def apply_subscription_event(
    session: Session, event: SubscriptionEvent, delivery: Delivery
) -> Outcome:
    subscription = event.data
    return apply_snapshot(
        session,
        Subscription,
        {"subscription_id": subscription.subscription_id},
        {
            "status": subscription.status,
            "product_id": subscription.product_id,
            "quantity": subscription.quantity,
            "customer_id": subscription.customer_id,
            "next_billing_date": subscription.next_billing_date,
            "previous_billing_date": subscription.previous_billing_date,
            "cancel_at_next_billing_date": subscription.cancel_at_next_billing_date,
            "cancelled_at": subscription.cancelled_at,
        },
        event_type=event.type,
        delivered=subscription.delivered,
        delivery=delivery,
        history=(
            SubscriptionHistory,
            {
                "subscription_id": subscription.subscription_id,
                "webhook_id": delivery.webhook_id,
                "type": event.type,
                "status": subscription.status,
                "product_id": subscription.product_id,
                "quantity": subscription.quantity,
                "event_at": delivery.event_at,
                "webhook_ts": delivery.webhook_ts,
            },
        ),
    )


ROUTES: dict[str, Handler] = {
    "subscription.active": apply_subscription_event,
    "subscription.updated": apply_subscription_event,
    "subscription.on_hold": apply_subscription_event,
    "subscription.renewed": apply_subscription_event,
    "subscription.plan_changed": apply_subscription_event,
    "subscription.cancelled": apply_subscription_event,
    "subscription.failed": apply_subscription_event,
    "subscription.expired": apply_subscription_event,
    # Known to the SDK beyond the promised 30; cheap to apply, and they carry the state.
    "subscription.past_due": apply_subscription_event,
    "subscription.paused": apply_subscription_event,
    "subscription.unpaused": apply_subscription_event,
    "subscription.update_payment_method": apply_subscription_event,
}
