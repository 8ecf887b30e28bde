"""Applying license key events to the read model: one row per key, latest state wins."""

from __future__ import annotations

from sqlalchemy.orm import Session

from shared.models import LicenseKey, Outcome
from shared.schemas import LicenseKeyEvent
from workers.handlers.base import Delivery, Handler
from workers.handlers.snapshot import apply_snapshot


def apply_license_key_event(
    session: Session, event: LicenseKeyEvent, delivery: Delivery
) -> Outcome:
    license_key = event.data
    return apply_snapshot(
        session,
        LicenseKey,
        {"id": license_key.id},
        {
            "key": license_key.key,
            "status": license_key.status,
            "customer_id": license_key.customer_id,
            "product_id": license_key.product_id,
            "expires_at": license_key.expires_at,
        },
        event_type=event.type,
        delivered=license_key.delivered,
        delivery=delivery,
    )


ROUTES: dict[str, Handler] = {
    "license_key.created": apply_license_key_event,
}
