"""Writing a verified delivery durably, before anything is acknowledged."""

from __future__ import annotations

from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from shared.db import dialect_insert, utcnow
from shared.models import EventStatus, WebhookEvent


@cache
def _insert_once(dialect: str) -> Any:
    # Built once: constructing the statement cost more CPU than running it.
    insert = dialect_insert(dialect)(WebhookEvent).on_conflict_do_nothing()
    return insert.returning(WebhookEvent.webhook_id)


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
    """Insert the delivery once; False when this webhook id was already recorded.

    The one INSERT is the whole transaction, run in autocommit: one round trip. The pool
    does not ping connections first (another round trip, on every request); a connection
    the server dropped is found on use instead, and the INSERT, idempotent on its key, is
    tried once more on a fresh one.
    """
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
    try:
        return _insert(engine, values)
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
    # A retry after a lost connection may find its own first INSERT committed: it then
    # answers "duplicate" and the delivery is queued by beat's re-drive instead.
    return _insert(engine, values)


def _insert(engine: Engine, values: dict[str, Any]) -> bool:
    stmt = _insert_once(engine.dialect.name)
    with engine.connect() as conn:
        autocommit = conn.execution_options(isolation_level="AUTOCOMMIT")
        return autocommit.execute(stmt, values).first() is not None
