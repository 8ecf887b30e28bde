"""What every handler receives besides the session and the typed event."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from shared.models import Outcome


@dataclass(frozen=True)
class Delivery:
    """The delivery's identity and occurrence-order key (the payload does not carry them)."""

    webhook_id: str
    webhook_ts: int
    event_at: datetime

    @property
    def order_key(self) -> tuple[datetime, int, str]:
        """Envelope timestamp, then `webhook-timestamp`, then `webhook-id` (DESIGN.md)."""
        return (self.event_at, self.webhook_ts, self.webhook_id)


Handler = Callable[[Session, Any, Delivery], Outcome]
