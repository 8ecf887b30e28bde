"""Snapshot rows: keep the state of the event that occurred last, in one statement."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import cache
from typing import Any, TypeVar, cast

from sqlalchemy import (
    ColumnElement,
    Table,
    bindparam,
    inspect,
    literal_column,
    select,
    tuple_,
)
from sqlalchemy.orm import Session

from shared.changes import Cause, record_change
from shared.db import dialect_insert, insert_once, utcnow
from shared.models import (
    Change,
    Dispute,
    HistoryMixin,
    LicenseKey,
    Outcome,
    Payment,
    Refund,
    SnapshotMixin,
    Subscription,
)
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
# Each snapshot record's kind in the change feed.
CHANGE_KINDS: dict[type[SnapshotMixin], str] = {
    Payment: "payment",
    Refund: "refund",
    Dispute: "dispute",
    Subscription: "subscription",
    LicenseKey: "license_key",
}


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
    dialect = session.get_bind().dialect.name
    table = _table(model)
    key = {name: getattr(data, name) for name in _primary_key(table)}
    # The row as it was, locked until the transaction ends: the change's `before`.
    held_row = execute(session, _locked_row(table), key).mappings().first()
    values: dict[str, Any] = {
        **{name: getattr(data, name) for name in model.record_columns()},
        "last_event_type": event.type,
        "last_event_at": delivery.event_at,
        "last_webhook_ts": delivery.webhook_ts,
        "last_webhook_id": delivery.webhook_id,
        "data": data.delivered,
        "updated_at": utcnow(),
    }
    upsert = _upsert(dialect, table, tuple(values))
    params = values
    if model.history is not None:
        step = history_row(model.history, event, delivery)
        if dialect == "postgresql":
            upsert = _with_history(upsert, _table(model.history), tuple(step))
            params = {**values, **{f"{HISTORY_PREFIX}{k}": v for k, v in step.items()}}
        else:
            record_history(session, model.history, step)
    written = execute(session, upsert, params).mappings().first()
    if written is not None:
        before = None if held_row is None else _record(model, held_row).representation()
        if held_row is None and dialect == "postgresql" and not written["inserted"]:
            # Another transaction created the row between our read and our upsert (which
            # waited for it to commit): the state it wrote is its change's `after`.
            before = _latest_after(session, CHANGE_KINDS[model], str(next(iter(key.values()))))
        after = _record(model, written).representation()
        record_change(
            session,
            kind=CHANGE_KINDS[model],
            entity_id=str(next(iter(key.values()))),
            customer_id=_customer_of(after),
            before=before,
            after=after,
            cause=Cause(delivery.webhook_id, event.type, delivery.event_at),
            run=execute,
        )
        return Outcome.APPLIED
    # Left alone: a later event holds the row, or this very delivery does (a replay).
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
    ).returning(*table.c, *_inserted(dialect))


def _inserted(dialect: str) -> tuple[Any, ...]:
    """On PostgreSQL, whether the upsert inserted (a new row has no xmax) or updated."""
    return (literal_column("(xmax = 0)").label("inserted"),) if dialect == "postgresql" else ()


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


@cache
def _locked_row(table: Table) -> Any:
    keys = [table.c[c.name] == bindparam(c.name) for c in table.primary_key]
    return select(table).where(*keys).with_for_update()


def _record(model: type[Row], row: Any) -> Row:
    """A detached record built from a row as the driver returned it (any zone): in UTC."""
    values = {}
    for column in _table(model).columns:
        value = row[column.name]
        if isinstance(value, datetime):
            value = value.astimezone(UTC)
        values[column.key] = value
    return model(**values)


def _customer_of(view: dict[str, Any]) -> str | None:
    customer = view.get("customer_id")
    if customer is None and isinstance(view.get("customer"), dict):
        customer = view["customer"].get("customer_id")
    return customer if isinstance(customer, str) else None


def _latest_after(session: Session, kind: str, entity_id: str) -> dict[str, Any] | None:
    return session.scalars(
        select(Change.after)
        .where(Change.kind == kind, Change.entity_id == entity_id)
        .order_by(Change.seq.desc())
        .limit(1)
    ).first()
