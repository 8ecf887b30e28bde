"""Snapshot rows: keep the state of the event that occurred last, in one statement."""

from __future__ import annotations

from functools import cache
from typing import Any, TypeVar, cast

from sqlalchemy import ColumnElement, Table, bindparam, inspect, select, tuple_
from sqlalchemy.orm import Session

from shared.db import dialect_insert, insert_once, utcnow
from shared.models import HistoryMixin, Outcome, SnapshotMixin
from workers.handlers.base import Delivery
from workers.schemas import (
    DisputeEvent,
    LicenseKeyEvent,
    PaymentEvent,
    RefundEvent,
    SubscriptionEvent,
)
from workers.statements import execute

Row = TypeVar("Row", bound=SnapshotMixin)

ORDER_COLUMNS = ("last_event_at", "last_webhook_ts", "last_webhook_id")
SnapshotEvent = PaymentEvent | RefundEvent | DisputeEvent | SubscriptionEvent | LicenseKeyEvent


def apply_snapshot(
    session: Session, model: type[Row], event: SnapshotEvent, delivery: Delivery
) -> Outcome:
    """Write the event's state to the entity's row unless the row holds a later event.

    The state is the model's own columns (`record_columns`), each taken from the field of
    Dodo's object of that name. One `INSERT ... ON CONFLICT DO UPDATE ... WHERE held order
    key < this one's`: the row is created, or locked and overwritten, or left alone, in one
    round trip. Two workers applying events of one entity at once are serialised on the row
    lock the upsert takes, and the second compares its order key with what the first
    committed, so no update is lost. Applying the delivery that already holds the row again
    changes nothing.

    A family with a history model (`model.history`) records the event there as
    `record_history` does, whatever the outcome; on PostgreSQL in the same statement (a
    data-modifying CTE), elsewhere (SQLite has no such CTE) in a statement of its own.
    """
    data = event.data
    values: dict[str, Any] = {
        **{name: getattr(data, name) for name in model.record_columns()},
        "last_event_type": event.type,
        "last_event_at": delivery.event_at,
        "last_webhook_ts": delivery.webhook_ts,
        "last_webhook_id": delivery.webhook_id,
        "data": data.delivered,
        "updated_at": utcnow(),
    }
    dialect = session.get_bind().dialect.name
    table = _table(model)
    upsert = _upsert(dialect, table, tuple(values))
    params = values
    if model.history is not None:
        step = history_row(model.history, event, delivery)
        if dialect == "postgresql":
            upsert = _with_history(upsert, _table(model.history), tuple(step))
            params = {**values, **{f"{HISTORY_PREFIX}{k}": v for k, v in step.items()}}
        else:
            record_history(session, model.history, step)
    if execute(session, upsert, params).first() is not None:
        return Outcome.APPLIED
    # Left alone: a later event holds the row, or this very delivery does (a replay).
    key = {name: values[name] for name in _primary_key(table)}
    held = execute(session, _held_key(table), key).one()
    return Outcome.APPLIED if tuple(held) == delivery.order_key else Outcome.SUPERSEDED


def history_row(
    model: type[HistoryMixin], event: SnapshotEvent, delivery: Delivery
) -> dict[str, Any]:
    """The history's columns: the object's fields of those names, and the delivery's."""
    return {
        **{name: getattr(event.data, name) for name in model.event_columns()},
        "webhook_id": delivery.webhook_id,
        "type": event.type,
        "event_at": delivery.event_at,
        "webhook_ts": delivery.webhook_ts,
    }


def record_history(session: Session, model: type[HistoryMixin], values: dict[str, Any]) -> None:
    """One history row per delivery (`webhook_id` is unique): a repeat adds nothing."""
    dialect = session.get_bind().dialect.name
    execute(session, insert_once(dialect, _table(model), ("webhook_id",)), values)


def _table(model: type[Any]) -> Table:
    return cast(Table, inspect(model).local_table)


@cache
def _primary_key(table: Table) -> tuple[str, ...]:
    return tuple(c.name for c in table.primary_key)


@cache
def _upsert(dialect: str, table: Table, columns: tuple[str, ...]) -> Any:
    """Built once per table and column set: building it cost more CPU than running it."""
    insert = dialect_insert(dialect)(table)
    keys = [c.name for c in table.primary_key]

    def order_key(source: Any) -> ColumnElement[Any]:
        at, ts, webhook_id = (source[name] for name in ORDER_COLUMNS)
        if dialect == "postgresql":
            # Code point order, as Python compares the ids, whatever the database's collation.
            webhook_id = webhook_id.collate("C")
        return tuple_(at, ts, webhook_id)

    return insert.on_conflict_do_update(
        index_elements=keys,
        set_={name: insert.excluded[name] for name in columns if name not in keys},
        where=order_key(table.c) < order_key(insert.excluded),
    ).returning(*table.primary_key)


HISTORY_PREFIX = "history_"


@cache
def _with_history(upsert: Any, history: Table, columns: tuple[str, ...]) -> Any:
    """The upsert, writing the history row first in a CTE: one round trip for both."""
    values: dict[str, Any] = {name: bindparam(f"{HISTORY_PREFIX}{name}") for name in columns}
    return upsert.add_cte(insert_once("postgresql", history, ("webhook_id",)).values(values).cte())


@cache
def _held_key(table: Table) -> Any:
    """The held order key, read under the lock the upsert took (still held: same transaction)."""
    keys = [table.c[c.name] == bindparam(c.name) for c in table.primary_key]
    return select(*(table.c[name] for name in ORDER_COLUMNS)).where(*keys)
