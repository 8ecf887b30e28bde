"""The routing table: event type -> the plain function that applies it to the read model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from shared.models import Outcome


@dataclass(frozen=True)
class Delivery:
    """What the handler needs to know of the delivery besides the payload: its order key."""

    webhook_id: str
    webhook_ts: int
    event_at: datetime

    @property
    def order_key(self) -> tuple[datetime, int, str]:
        return (self.event_at, self.webhook_ts, self.webhook_id)


Handler = Callable[[Session, Any, Delivery], Outcome]

# Filled by the family modules; a type with no route is stored and marked `ignored`.
ROUTES: dict[str, Handler] = {}
