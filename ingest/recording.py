"""Writing a verified delivery durably, before anything is acknowledged."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Engine

from shared.db import insert_for, utcnow
from shared.models import EventStatus, WebhookEvent


def record_delivery(
    engine: Engine,
    *,
    webhook_id: str,
    webhook_ts: int,
    headers: dict[str, str],
    body: bytes,
    event_type: str | None,
    event_at: datetime | None,
    dead_reason: str | None = None,
) -> bool:
    """Insert the delivery once; False when this webhook id was already recorded."""
    now = utcnow()
    values = {
        "webhook_id": webhook_id,
        "type": event_type,
        "status": EventStatus.DEAD if dead_reason else EventStatus.PENDING,
        "attempts": 0,
        "last_error": dead_reason,
        "body": body,
        "headers": headers,
        "webhook_ts": webhook_ts,
        "event_at": event_at,
        "received_at": now,
        "enqueued_at": None if dead_reason else now,
    }
    stmt = insert_for(engine)(WebhookEvent).values(values).on_conflict_do_nothing()
    with engine.begin() as conn:
        return conn.execute(stmt.returning(WebhookEvent.webhook_id)).first() is not None
