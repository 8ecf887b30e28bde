"""The routing table: event type -> the plain function that applies it to the read model."""

from __future__ import annotations

from workers.handlers import credits, disputes, license_keys, payments, refunds, subscriptions
from workers.handlers.base import Delivery, Handler

# One table for the whole product; a type with no route is stored and marked `ignored`.
ROUTES: dict[str, Handler] = {
    **payments.ROUTES,
    **refunds.ROUTES,
    **disputes.ROUTES,
    **subscriptions.ROUTES,
    **license_keys.ROUTES,
    **credits.ROUTES,
}

__all__ = ["ROUTES", "Delivery", "Handler"]
