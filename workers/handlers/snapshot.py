"""Snapshot rows: lock the entity, keep the state of the event that occurred last."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import inspect, select
from sqlalchemy.orm import Session

from shared.db import insert_for, utcnow
from shared.models import Base, Outcome, SnapshotMixin
from workers.handlers.base import Delivery

Row = TypeVar("Row", bound=SnapshotMixin)


def apply_snapshot(
    session: Session,
    model: type[Row],
    key: dict[str, str],
    state: dict[str, Any],
    *,
    event_type: str,
    delivered: dict[str, Any],
    delivery: Delivery,
) -> Outcome:
    """Write `state` to the entity's row unless the row holds an event that occurred later.

    The row is created with `INSERT ... ON CONFLICT DO NOTHING` and then locked with
    `SELECT ... FOR UPDATE`, so two workers applying events of one entity at once are
    serialised on that row: the second one compares its order key with what the first
    committed, and no update is lost. Applying the delivery that already holds the row
    again changes nothing.
    """
    values: dict[str, Any] = {
        **key,
        **state,
        "last_event_type": event_type,
        "last_event_at": delivery.event_at,
        "last_webhook_ts": delivery.webhook_ts,
        "last_webhook_id": delivery.webhook_id,
        "data": delivered,
        "updated_at": utcnow(),
    }
    table = inspect(model).local_table
    insert = insert_for(session)
    created = session.execute(
        insert(table).values(values).on_conflict_do_nothing().returning(*table.primary_key)
    ).first()
    if created is not None:
        return Outcome.APPLIED
    row = session.execute(
        select(model).filter_by(**key).with_for_update().execution_options(populate_existing=True)
    ).scalar_one()
    held = (row.last_event_at, row.last_webhook_ts, row.last_webhook_id)
    if delivery.order_key < held:
        return Outcome.SUPERSEDED
    if delivery.order_key > held:
        for name, value in values.items():
            setattr(row, name, value)
        session.flush()
    return Outcome.APPLIED


def record_history(session: Session, model: type[Base], values: dict[str, Any]) -> None:
    """One history row per delivery (`webhook_id` is unique): a repeat adds nothing."""
    insert = insert_for(session)
    table = inspect(model).local_table
    session.execute(
        insert(table).values(values).on_conflict_do_nothing(index_elements=["webhook_id"])
    )
