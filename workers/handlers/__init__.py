"""The routing table: event type -> the plain function that applies it to the read model."""

from __future__ import annotations

from shared.catalog import KIND_OF
from workers.handlers import credits, disputes, license_keys, payments, refunds, subscriptions
from workers.handlers.base import Delivery, Handler

# One handler per kind of event (shared/catalog.py names each type's kind).
HANDLERS: dict[str, Handler] = {
    "payment": payments.apply_payment_event,
    "refund": refunds.apply_refund_event,
    "dispute": disputes.apply_dispute_event,
    "subscription": subscriptions.apply_subscription_event,
    "license_key": license_keys.apply_license_key_event,
    "credit_entry": credits.apply_credit_entry,
    "credit_balance_low": credits.apply_balance_low,
}

# One table for the whole product; a type with no route is stored and marked `ignored`.
ROUTES: dict[str, Handler] = {event_type: HANDLERS[kind] for event_type, kind in KIND_OF.items()}

__all__ = ["HANDLERS", "ROUTES", "Delivery", "Handler"]
