"""Applying license key events to the read model: one row per key, latest state wins."""

from __future__ import annotations

from sqlalchemy.orm import Session

from shared.models import LicenseKey, Outcome
from workers.handlers.base import Delivery
from workers.handlers.snapshot import apply_snapshot
from workers.schemas import LicenseKeyEvent


def apply_license_key_event(
    session: Session, event: LicenseKeyEvent, delivery: Delivery
) -> Outcome:
    return apply_snapshot(session, LicenseKey, event, delivery)
