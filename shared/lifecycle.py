"""Data lifecycle: retention (the purge of old raw bodies) and erasure of a customer's data.

Both run in short transactions beside the ingest and the workers, and both can run twice: a
second run finds nothing left to do.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from itertools import chain
from typing import Any, Final, NamedTuple, TypeVar, cast

from psycopg.errors import DeadlockDetected, SerializationFailure
from sqlalchemy import (
    ColumnElement,
    Table,
    Text,
    case,
    delete,
    false,
    func,
    inspect,
    literal,
    null,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from shared.bodies import (
    Day,
    count_day,
    days,
    drop_day,
    droppable,
    ensure_ahead,
    partitioned,
    record_drop,
    replace_stored,
    stored,
)
from shared.changes import DEFERRED
from shared.db import dialect_insert, transaction, utcnow
from shared.envelope import (
    NO_SUBJECTS,
    Subjects,
    customer_of_data,
    event_subjects,
    payment_of,
)
from shared.models import (
    PURGEABLE,
    UNATTRIBUTED,
    Base,
    Change,
    CreditEntry,
    CustomerErasure,
    DeliveryStatus,
    Dispute,
    EventBody,
    LicenseKey,
    LifecycleCounter,
    OutboundAttempt,
    OutboundDelivery,
    Payment,
    Refund,
    Subscription,
    WebhookEvent,
)

T = TypeVar("T")

# ---------------------------------------------------------------------------- retention

PURGED_EVENTS = "purged_events"
PURGED_BYTES = "purged_bytes"
# After each batch the purge pauses at least this many times as long as the batch took
# (as pt-archiver's --sleep-coef): on a busy host a batch takes longer, and the purge then
# backs off with it, keeping to at most a third of its connection's time.
PAUSE_PER_BATCH_SECOND = 2.0


@dataclass
class PurgeResult:
    """What a purge run removed (or, dry, would remove)."""

    retention_days: int
    cutoff: datetime | None
    dry_run: bool = False
    events: int = 0
    bytes: int = 0
    batches: int = 0
    # False when the run stopped at its time budget with purgeable events left.
    complete: bool = True
    # Outbound deliveries of the change feed, delivered before the cutoff, removed with
    # their attempts.
    deliveries: int = 0
    # Days of bodies dropped whole (PostgreSQL: shared/bodies.py); `events` and `bytes`
    # count theirs too (a day's bytes: its partition's size on disk).
    days: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "retention_days": self.retention_days,
            "cutoff": self.cutoff.isoformat() if self.cutoff else None,
            "dry_run": self.dry_run,
            "events": self.events,
            "bytes": self.bytes,
            "complete": self.complete,
            "deliveries": self.deliveries,
            "days": self.days,
        }


def purge_cutoff(retention_days: int, now: datetime | None = None) -> datetime | None:
    """Events whose processing finished before this lose their body; None: retention is off."""
    if retention_days <= 0:
        return None
    return (now or utcnow()) - timedelta(days=retention_days)


# The purge's mark, in `lifecycle_counters` as microseconds since the epoch: every purgeable
# event whose processing finished before it has been purged. A run starts there instead of at
# the first processed event: a purged row's old version stays in `ix_webhook_events_body_in_row`
# until VACUUM clears it, and walking those again would cost a heap visit each.
PURGE_MARK = "purge_mark_us"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# pg_advisory_xact_lock's key for a purge batch: b"dodopurg" as a big-endian int64. Two runs
# at once (beat's and an operator's) take turns batch by batch: neither waits on the other's
# rows, nor counts one twice.
PURGE_LOCK: Final = int.from_bytes(b"dodopurg", "big", signed=True)


def purge_mark(conn: Session | Connection) -> datetime | None:
    """Where the next purge run starts: every purgeable event processed before it is purged."""
    value = conn.scalar(select(LifecycleCounter.value).where(LifecycleCounter.name == PURGE_MARK))
    return None if value is None else _EPOCH + timedelta(microseconds=int(value))


def _advance_mark(session: Session, reached: datetime) -> None:
    table = cast(Table, LifecycleCounter.__table__)
    insert = dialect_insert(session.get_bind().dialect.name)(table)
    value = (reached - _EPOCH) // timedelta(microseconds=1)
    session.execute(
        insert.values(name=PURGE_MARK, value=value).on_conflict_do_update(
            index_elements=["name"],
            set_={
                "value": case(
                    (insert.excluded.value > table.c.value, insert.excluded.value),
                    else_=table.c.value,
                )
            },
        )
    )


def _held(since: datetime | None) -> list[ColumnElement[bool]]:
    """Processed and ignored events still holding their body, processed from `since` on."""
    ev = WebhookEvent
    where: list[ColumnElement[bool]] = [
        ev.status.in_([str(s) for s in PURGEABLE]),
        ev.body.is_not(None),
        ev.purged_at.is_(None),
    ]
    if since is not None:
        where.append(ev.processed_at >= since)
    return where


def _purgeable(cutoff: datetime, since: datetime | None = None) -> list[ColumnElement[bool]]:
    return [*_held(since), WebhookEvent.processed_at < cutoff]


def oldest_body_kept(conn: Session | Connection) -> datetime | None:
    """When the oldest processed or ignored event still holding its body finished: in its
    row, or (PostgreSQL) in the oldest day of bodies, as when the first event of that day
    was received (processing finishes within seconds of it)."""
    held = _held(purge_mark(conn))
    oldest = conn.scalar(select(func.min(WebhookEvent.processed_at)).where(*held))
    if partitioned(conn):
        first = next(iter(days(conn)), None)
        if first is not None:
            received = conn.scalar(
                select(func.min(WebhookEvent.received_at)).where(
                    WebhookEvent.received_at >= first.start
                )
            )
            if received is not None and (oldest is None or received < oldest):
                oldest = received
    return oldest


def _stored_size() -> ColumnElement[int]:
    ev = WebhookEvent
    return cast(
        ColumnElement[int],
        func.coalesce(func.length(ev.body), 0)
        + func.coalesce(func.length(ev.headers.cast(Text())), 0),
    )


@dataclass(frozen=True)
class Batch:
    events: int
    bytes: int
    # The last `processed_at` of the batch: where the next one starts.
    reached: datetime | None


def purge_batch(
    session: Session, cutoff: datetime, limit: int, after: datetime | None = None
) -> Batch:
    """Purge up to `limit` events, oldest first from `after`, in the caller's transaction,
    and move the mark to the last one.

    On PostgreSQL one statement picks the rows and rewrites them (`UPDATE … FROM (SELECT …
    LIMIT) RETURNING`), after the batch lock (`PURGE_LOCK`) that makes a second purge run
    wait for this batch's commit rather than pick the same rows. Only these rows are locked,
    for the milliseconds of the statement: the ingest inserts new rows and never waits (a
    duplicate delivery of one of these waits for this transaction at most, then answers 200
    duplicate), and an erasure that holds one of them makes the batch wait for it.
    """
    ev = WebhookEvent
    picked = (
        select(ev.webhook_id, ev.processed_at, _stored_size().label("size"))
        .where(*_purgeable(cutoff, after))
        .order_by(ev.processed_at)
        .limit(limit)
    )
    # null(): the JSON type would store a JSON `null` for None.
    purged = {"body": null(), "headers": null(), "purged_at": utcnow()}
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(PURGE_LOCK)))
        chosen = picked.subquery()
        rows = session.execute(
            update(ev)
            .where(ev.webhook_id == chosen.c.webhook_id, ev.purged_at.is_(None))
            .values(purged)
            .returning(chosen.c.processed_at, chosen.c.size)
            .execution_options(synchronize_session=False)
        ).all()
    else:  # SQLite (the dev server): one writer at a time, and no RETURNING from a FROM.
        rows = session.execute(picked).all()
        session.execute(
            update(ev)
            .where(ev.webhook_id.in_([row.webhook_id for row in rows]))
            .values(purged)
            .execution_options(synchronize_session=False)
        )
    if not rows:
        return Batch(0, 0, after)
    events, size = len(rows), sum(int(row.size or 0) for row in rows)
    reached = max(row.processed_at for row in rows)
    add_counters(session, {PURGED_EVENTS: events, PURGED_BYTES: size})
    _advance_mark(session, reached)
    return Batch(events, size, reached)


def _delivered_before(cutoff: datetime) -> list[ColumnElement[bool]]:
    return [
        OutboundDelivery.status == DeliveryStatus.DELIVERED,
        OutboundDelivery.delivered_at < cutoff,
    ]


def purge_deliveries_batch(session: Session, cutoff: datetime, limit: int) -> int:
    """Remove up to `limit` outbound deliveries delivered before `cutoff`, and their
    attempts, in the caller's transaction. Pending and dead ones stay (a retry needs them)."""
    ids = list(
        session.scalars(
            select(OutboundDelivery.id)
            .where(*_delivered_before(cutoff))
            .order_by(OutboundDelivery.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )
    if ids:
        session.execute(delete(OutboundAttempt).where(OutboundAttempt.delivery_id.in_(ids)))
        session.execute(delete(OutboundDelivery).where(OutboundDelivery.id.in_(ids)))
    return len(ids)


def add_counters(session: Session, amounts: dict[str, int]) -> None:
    table = cast(Table, LifecycleCounter.__table__)
    insert = dialect_insert(session.get_bind().dialect.name)(table)
    session.execute(
        insert.values(
            [{"name": name, "value": value} for name, value in amounts.items()]
        ).on_conflict_do_update(
            index_elements=["name"], set_={"value": table.c.value + insert.excluded.value}
        )
    )


def purge(
    factory: sessionmaker[Session],
    *,
    retention_days: int,
    batch_size: int,
    dry_run: bool = False,
    run_seconds: float | None = None,
    pause_seconds: float = 0.0,
    progress: Callable[[PurgeResult], None] | None = None,
) -> PurgeResult:
    """Remove the body and headers of events processed or ignored longer ago than
    `retention_days`, one short transaction per batch, until none is left (or `run_seconds`
    have passed: the next run carries on). Dead letters, pending and retrying events keep
    theirs; every row and its `webhook_id` stay, so a late duplicate is still recognised.
    `pause_seconds` between batches leaves the database to the ingest and the workers; the
    pause grows to `PAUSE_PER_BATCH_SECOND` times the batch's own time when that is longer.
    """
    cutoff = purge_cutoff(retention_days)
    result = PurgeResult(retention_days, cutoff, dry_run)
    if cutoff is None:
        return result
    engine: Engine = factory.kw["bind"]
    with factory() as session:
        mark = purge_mark(session)
        old_days = droppable(session, cutoff) if partitioned(engine) else []
        if dry_run:
            count, size = session.execute(
                select(func.count(), func.coalesce(func.sum(_stored_size()), 0)).where(
                    *_purgeable(cutoff, mark)
                )
            ).one()
            result.deliveries = int(
                session.scalar(select(func.count()).where(*_delivered_before(cutoff))) or 0
            )
            result.events, result.bytes = int(count), int(size)
            for day in old_days:
                events, size = count_day(session, day)
                result.events, result.bytes, result.days = (
                    result.events + events,
                    result.bytes + size,
                    result.days + 1,
                )
            return result
    deadline = None if run_seconds is None else time.monotonic() + run_seconds
    ensure_ahead(engine)
    for n, day in enumerate(old_days):
        if n and deadline is not None and time.monotonic() >= deadline:
            result.complete = False
            return result
        if n and pause_seconds:
            time.sleep(pause_seconds)
        _drop_day(factory, day, result)
        if progress is not None:
            progress(result)
    while True:
        with transaction(factory) as session:
            removed = purge_deliveries_batch(session, cutoff, batch_size)
        result.deliveries += removed
        if removed < batch_size:
            break
    reached: list[datetime | None] = [mark]

    def step() -> int:
        batch = _in_transaction_retried(
            factory, lambda session: purge_batch(session, cutoff, batch_size, reached[0])
        )
        reached[0] = batch.reached
        result.events += batch.events
        result.bytes += batch.bytes
        result.batches += 1
        if progress is not None and batch.events:
            progress(result)
        return batch.events

    left = None if deadline is None else max(0.0, deadline - time.monotonic())
    result.complete = paced(step, full=batch_size, pause_seconds=pause_seconds, run_seconds=left)
    return result


def _drop_day(factory: sessionmaker[Session], day: Day, result: PurgeResult) -> None:
    """Drop one day of bodies (shared/bodies.py `drop_day`): the bodies that must outlive it
    go into their event rows first (the purge in place empties those in their time)."""

    def counted(session: Session, events: int, size: int) -> None:
        add_counters(session, {PURGED_EVENTS: events, PURGED_BYTES: size})
        record_drop(session, day, events, size)

    dropped = drop_day(factory.kw["bind"], day, counted)
    if dropped is not None:
        result.events += dropped[0]
        result.bytes += dropped[1]
        result.days += 1


def paced(
    step: Callable[[], int], *, full: int, pause_seconds: float, run_seconds: float | None
) -> bool:
    """Run `step` (one short transaction; it returns how many rows it took) until it takes
    fewer than `full` (True: done) or `run_seconds` have passed (False: the next run carries
    on). After each step it pauses `pause_seconds`, or `PAUSE_PER_BATCH_SECOND` times the
    step's own time when that is longer: on a busy host the job backs off with it."""
    deadline = None if run_seconds is None else time.monotonic() + run_seconds
    while True:
        started = time.monotonic()
        taken = step()
        took = time.monotonic() - started
        if taken < full:
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
        if pause_seconds:
            time.sleep(max(pause_seconds, took * PAUSE_PER_BATCH_SECOND))


@dataclass
class BackfillResult:
    """What a backfill run of the events' subjects did."""

    examined: int = 0
    filled: int = 0
    complete: bool = True


def subjects_of_body(body: bytes | None) -> Subjects:
    """The `customer_id` and `payment_id` the ingest records for this body."""
    envelope = load_body(body)
    if envelope is None:
        return NO_SUBJECTS
    return event_subjects(str(envelope.get("type", "")), envelope.get("data"))


def backfill_subjects(
    factory: sessionmaker[Session],
    *,
    batch_size: int,
    run_seconds: float | None = None,
    pause_seconds: float = 0.0,
) -> BackfillResult:
    """Record `customer_id` and `payment_id` of the events held without them (recorded before
    migration 0006_event_subjects) from their bodies, as the ingest records them: from then on
    the erasure finds them by index instead of reading their bodies. A run walks that set
    once, in received order, in short transactions paced as the purge's; events that name
    neither stay in it (the erasure still reads those few), and rows another transaction holds
    are left to the next run."""
    ev = WebhookEvent
    result = BackfillResult()
    position: list[tuple[datetime, str] | None] = [None]

    def step() -> int:
        with transaction(factory) as session:
            query = select(ev.webhook_id, ev.received_at, ev.body).where(
                UNATTRIBUTED, ev.body.is_not(None)
            )
            if position[0] is not None:
                query = query.where(tuple_(ev.received_at, ev.webhook_id) > tuple_(*position[0]))
            rows = session.execute(
                query.order_by(ev.received_at, ev.webhook_id)
                .limit(batch_size)
                .with_for_update(skip_locked=True)
            ).all()
            for row in rows:
                subjects = subjects_of_body(row.body)
                if subjects.customer_id is None and subjects.payment_id is None:
                    continue
                session.execute(
                    update(ev)
                    .where(ev.webhook_id == row.webhook_id)
                    .values(customer_id=subjects.customer_id, payment_id=subjects.payment_id)
                    .execution_options(synchronize_session=False)
                )
                result.filled += 1
        result.examined += len(rows)
        if rows:
            position[0] = (rows[-1].received_at, rows[-1].webhook_id)
        return len(rows)

    result.complete = paced(
        step, full=batch_size, pause_seconds=pause_seconds, run_seconds=run_seconds
    )
    return result


def lifecycle_totals(session: Session) -> dict[str, int]:
    rows = session.execute(
        select(LifecycleCounter.name, LifecycleCounter.value).where(
            LifecycleCounter.name != PURGE_MARK
        )
    ).all()
    return {name: int(value) for name, value in rows}


# ----------------------------------------------------------------------------- erasure

# Keys whose whole value is the customer's personal data wherever they appear in Dodo's
# objects (customer, billing address, card, tax id, custom fields, free-text comments).
PERSONAL_KEYS = frozenset(
    {
        "email",
        "name",
        "phone_number",
        "phone",
        "metadata",
        "billing",
        "billing_address",
        "shipping",
        "shipping_address",
        "address",
        "street",
        "city",
        "state",
        "zipcode",
        "postal_code",
        "tax_id",
        "customer_business_name",
        "customer_name",
        "customer_email",
        "custom_field_responses",
        "cancellation_comment",
        # Free text, written by the customer, the merchant or a bank about the customer: an
        # event arriving after the erasure may carry the customer's name in it, and the
        # personal strings it would be matched against are gone by then.
        "description",
        "remarks",
        "reason",
        "comment",
        "note",
        "notes",
        "card_holder_name",
        "card_last_four",
        "card_network",
        "card_type",
        "card_issuing_country",
        "card_exp_month",
        "card_exp_year",
    }
)
# Values kept whatever they hold: ids, amounts, statuses, timestamps, currencies, types.
KEPT_SUFFIXES = (
    "id",
    "_at",
    "amount",
    "_status",
    "status",
    "_date",
    "_before",
    "_after",
    "currency",
    "type",
    "timestamp",
    "quantity",
    "balance",
)
ERASED_TEXT = "[erased]"
# A personal string shorter than this is replaced only where it is a whole value: "CA" is a
# state, and also inside many other words.
MIN_SUBSTRING = 4
SIGNATURE_HEADER = "webhook-signature"


def _kept(key: str) -> bool:
    return key.endswith(KEPT_SUFFIXES)


def personal_strings(value: Any, *, inside: bool = False) -> set[str]:
    """Every string held under a personal key: what must not survive anywhere else either."""
    found: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            found |= personal_strings(item, inside=inside or key in PERSONAL_KEYS)
    elif isinstance(value, list):
        for item in value:
            found |= personal_strings(item, inside=inside)
    elif inside and isinstance(value, str) and value.strip() and value != ERASED_TEXT:
        found.add(value)
    return found


def _blank(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _blank(item) for key, item in value.items()}
    if isinstance(value, list):
        return []
    return None


def _scrub_text(value: str, strings: Sequence[str]) -> str:
    for personal in strings:
        if value == personal:
            return ERASED_TEXT
        if len(personal) >= MIN_SUBSTRING and personal in value:
            value = value.replace(personal, ERASED_TEXT)
    return value


def erase_json(value: Any, strings: Iterable[str] = ()) -> Any:
    """The value without personal data: personal keys blanked (null; `metadata` `{}`), and
    the given personal strings replaced wherever else they occur, but never in an id, an
    amount, a status or a timestamp."""
    ordered = sorted(set(strings), key=len, reverse=True)
    return _erase(value, ordered)


def _erase(value: Any, strings: Sequence[str]) -> Any:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if key in PERSONAL_KEYS:
                out[key] = {} if key == "metadata" and isinstance(item, dict) else _blank(item)
            elif _kept(key) and not isinstance(item, dict | list):
                out[key] = item
            else:
                out[key] = _erase(item, strings)
        return out
    if isinstance(value, list):
        return [_erase(item, strings) for item in value]
    if isinstance(value, str) and strings:
        return _scrub_text(value, strings)
    return value


def load_body(body: bytes | None) -> dict[str, Any] | None:
    if not body:
        return None
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def customer_in_body(body: bytes | None) -> str | None:
    envelope = load_body(body)
    return customer_of_data(envelope.get("data")) if envelope else None


@dataclass
class Scope:
    """The rows that hold a customer's data, found by id: theirs, and their payments'."""

    customer_id: str
    payment_ids: set[str] = field(default_factory=set)
    webhook_ids: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class PersonalTable:
    """A table that keeps customer data: its JSON (and text) columns, and how to find the
    customer's rows. A new such table (the change feed's, say) is one more entry below."""

    model: type[Base]
    json_columns: tuple[str, ...]
    rows: Callable[[Scope], ColumnElement[bool]]
    text_columns: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return str(self.model.__tablename__)


def _in(column: Any, values: set[str]) -> ColumnElement[bool]:
    return cast(ColumnElement[bool], column.in_(sorted(values))) if values else false()


def _changes_of(scope: Scope) -> ColumnElement[bool]:
    """The customer's changes: theirs by id, their payments', and those their events caused
    (a refund's or a dispute's record carries no customer id). `_erase_deferred_changes` applies
    the same rule to the changes a batch has not written yet."""
    return or_(
        Change.customer_id == scope.customer_id,
        _in(Change.entity_id, scope.payment_ids),
        _in(Change.cause_webhook_id, scope.webhook_ids),
    )


# The read model's and the change feed's tables with personal data. `webhook_events` (raw
# bodies and headers) is erased by `_erase_events`. Not listed, as they hold none:
# `credit_balances` (amounts and ids) and the histories (`dispute_history`,
# `subscription_history`: statuses, stages, product and quantity).
PERSONAL_TABLES: tuple[PersonalTable, ...] = (
    PersonalTable(Payment, ("data",), lambda s: Payment.customer_id == s.customer_id),
    PersonalTable(Refund, ("data",), lambda s: _in(Refund.payment_id, s.payment_ids)),
    PersonalTable(Dispute, ("data",), lambda s: _in(Dispute.payment_id, s.payment_ids)),
    PersonalTable(Subscription, ("data",), lambda s: Subscription.customer_id == s.customer_id),
    PersonalTable(LicenseKey, ("data",), lambda s: LicenseKey.customer_id == s.customer_id),
    PersonalTable(CreditEntry, ("data",), lambda s: CreditEntry.customer_id == s.customer_id),
    # The change feed: a change's `before` and `after` are records' representations.
    PersonalTable(Change, ("before", "after"), lambda s: _changes_of(s)),
    # What a merchant endpoint answered may echo the change it was sent.
    PersonalTable(
        OutboundAttempt,
        (),
        lambda s: OutboundAttempt.delivery_id.in_(
            select(OutboundDelivery.id).where(
                OutboundDelivery.change_id.in_(select(Change.id).where(_changes_of(s)))
            )
        ),
        text_columns=("response_head", "error"),
    ),
)


@dataclass
class TableCount:
    rows: int = 0
    changed: int = 0


@dataclass
class ErasureResult:
    customer_id: str
    dry_run: bool
    counts: dict[str, TableCount]
    erasure_id: int | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def found(self) -> bool:
        return any(count.rows for count in self.counts.values())

    def counts_json(self) -> dict[str, dict[str, int]]:
        return {
            name: {"rows": count.rows, "changed": count.changed}
            for name, count in self.counts.items()
        }

    def as_json(self) -> dict[str, Any]:
        return {
            "customer_id": self.customer_id,
            "dry_run": self.dry_run,
            "erasure_id": self.erasure_id,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "counts": self.counts_json(),
        }


class ErasureError(ValueError):
    """An erasure that cannot run, in one line (HTTP 400, or the CLI's error)."""


def check_customer_id(customer_id: str) -> str:
    customer_id = customer_id.strip() if isinstance(customer_id, str) else ""
    if not customer_id or len(customer_id) > 255 or "\x00" in customer_id:
        raise ErasureError("customer id: expected 1-255 characters, e.g. cus_123")
    return customer_id


def erase_customer(
    factory: sessionmaker[Session],
    customer_id: str,
    *,
    dry_run: bool = False,
    requested_by: str = "unknown",
    batch_size: int = 200,
) -> ErasureResult:
    """Remove a customer's personal data from raw bodies, headers and the read model.

    Ids, amounts, statuses and timestamps stay, and so do the ledger's amounts (its chain
    and balances do not change). First the erasure is recorded (`customer_erasures`): from
    then on a worker that finishes an event of this customer erases it in the same
    transaction (workers/claims.py). Then the customer's events are searched and each is
    locked before anything else is erased: a worker that checked for an erasure before it
    was recorded holds its event's row lock until it commits, so the erasure waits for it
    and then sees what it wrote. An event is either found here or erased by its worker.
    """
    customer_id = check_customer_id(customer_id)
    result = ErasureResult(customer_id, dry_run, {})
    if not dry_run:
        result.erasure_id, result.started_at = _mark(factory, customer_id, requested_by)
    with factory() as session:
        scope = find_scope(session, customer_id)
    strings = _collect_strings(factory, scope)
    result.counts["webhook_events"] = _erase_events(
        factory, sorted(scope.webhook_ids), strings, dry_run=dry_run, batch_size=batch_size
    )
    for table in PERSONAL_TABLES:
        result.counts[table.name] = _erase_table(factory, table, scope, strings, dry_run=dry_run)
    if not dry_run:
        result.finished_at = utcnow()
        with transaction(factory) as session:
            session.execute(
                update(CustomerErasure)
                .where(CustomerErasure.id == result.erasure_id)
                .values(finished_at=result.finished_at, counts=result.counts_json())
            )
    return result


def _mark(
    factory: sessionmaker[Session], customer_id: str, requested_by: str
) -> tuple[int, datetime]:
    now = utcnow()
    with transaction(factory) as session:
        row = CustomerErasure(
            customer_id=customer_id, started_at=now, requested_by=requested_by[:255], counts={}
        )
        session.add(row)
        session.flush()
        return row.id, now


def _quoted(value: str) -> bytes:
    # As JSON writes the id, quotes included, so cus_1 does not find cus_12.
    return json.dumps(value).encode()


def _events_where(
    session: Session, where: ColumnElement[bool], keep: Callable[[dict[str, Any] | None], bool]
) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """The held events `where` selects whose parsed body `keep` accepts: the columns only
    find candidates, the body decides whose an event is."""
    ev = WebhookEvent
    rows = session.execute(select(ev.webhook_id, ev.received_at, ev.body).where(where)).all()
    found = stored(session, [(r.webhook_id, r.received_at) for r in rows if r.body is None])
    for webhook_id, _, body in rows:
        if body is None:
            body = found.get(webhook_id, (None, None))[0]
        envelope = load_body(body)
        if body is not None and keep(envelope):
            yield webhook_id, envelope


def _unattributed_matching(
    session: Session, needles: Sequence[bytes], keep: Callable[[dict[str, Any] | None], bool]
) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """Events recorded with neither a customer nor a payment (before migration 0006, or
    naming neither) whose body contains one of the needles: the scan that finds what the
    columns cannot. Retention purges these bodies in time, and then it reads nothing."""
    ev, held = WebhookEvent, EventBody
    for start in range(0, len(needles), 50):
        chunk = [literal(n) for n in needles[start : start + 50]]
        yield from _events_where(
            session, UNATTRIBUTED & _body_contains_literals(session, ev.body, chunk), keep
        )
        if partitioned(session):
            # Those whose body is in its day's partition.
            in_days = (
                select(held.webhook_id)
                .join(ev, (ev.webhook_id == held.webhook_id) & (ev.received_at == held.stored_at))
                .where(
                    UNATTRIBUTED,
                    ev.body.is_(None),
                    _body_contains_literals(session, held.body, chunk),
                )
            )
            yield from _events_where(session, ev.webhook_id.in_(in_days), keep)


def _body_contains_literals(
    session: Session, body: Any, needles: Sequence[Any]
) -> ColumnElement[bool]:
    if session.get_bind().dialect.name == "postgresql":
        return or_(*(func.position(needle.op("IN")(body)) > 0 for needle in needles))
    return or_(*(func.instr(body, needle) > 0 for needle in needles))


def find_scope(session: Session, customer_id: str) -> Scope:
    """The customer's events (by `data.customer.customer_id` or `data.customer_id`), their
    payments (read model and events), and the refund and dispute events of those payments.

    Events are looked up by the `customer_id` and `payment_id` the ingest recorded with them
    (indexed), and those recorded without either by a scan of their bodies."""
    ev = WebhookEvent
    scope = Scope(customer_id)
    scope.payment_ids.update(
        session.scalars(select(Payment.payment_id).where(Payment.customer_id == customer_id))
    )

    def theirs(envelope: dict[str, Any] | None) -> bool:
        return envelope is not None and customer_of_data(envelope.get("data")) == customer_id

    found = chain(
        _events_where(session, ev.customer_id == customer_id, theirs),
        _unattributed_matching(session, [_quoted(customer_id)], theirs),
    )
    for webhook_id, envelope in found:
        scope.webhook_ids.add(webhook_id)
        payment = payment_of(envelope)
        if payment is not None:
            scope.payment_ids.add(payment)

    def of_their_payments(envelope: dict[str, Any] | None) -> bool:
        # Events that name a customer were matched by it above; these name none (disputes).
        data = envelope.get("data") if envelope else None
        return (
            isinstance(data, dict)
            and customer_of_data(data) is None
            and data.get("payment_id") in scope.payment_ids
        )

    payment_ids = sorted(scope.payment_ids)
    for start in range(0, len(payment_ids), 500):
        chunk = payment_ids[start : start + 500]
        where = ev.customer_id.is_(None) & ev.payment_id.in_(chunk)
        for webhook_id, _ in _events_where(session, where, of_their_payments):
            scope.webhook_ids.add(webhook_id)
    needles = [_quoted(p) for p in payment_ids]
    for webhook_id, _ in _unattributed_matching(session, needles, of_their_payments):
        scope.webhook_ids.add(webhook_id)
    return scope


def _collect_strings(factory: sessionmaker[Session], scope: Scope) -> set[str]:
    strings: set[str] = set()
    with factory() as session:
        ids = sorted(scope.webhook_ids)
        for start in range(0, len(ids), 500):
            for kept in _stored_events(session, ids[start : start + 500], lock=False).values():
                strings |= personal_strings(load_body(kept.body))
        for table in PERSONAL_TABLES:
            columns = [getattr(table.model, c) for c in table.json_columns]
            if not columns:
                continue  # text only: scrubbed of the strings the JSON columns give
            for row in session.execute(select(*columns).where(table.rows(scope))):
                for value in row:
                    strings |= personal_strings(value)
    return strings


def erase_body(
    body: bytes | None, headers: dict[str, str] | None, strings: Iterable[str]
) -> tuple[bytes | None, dict[str, str] | None] | None:
    """The body and headers without personal data, or None when they hold none."""
    if body is None:
        return None
    envelope = load_body(body)
    ordered = sorted(set(strings), key=len, reverse=True)
    if envelope is None:
        # Not a JSON object (dead on arrival): the personal strings known are cut out.
        cleaned = body
        for personal in ordered:
            if len(personal) >= MIN_SUBSTRING:
                cleaned = cleaned.replace(personal.encode(), ERASED_TEXT.encode())
        new_body = cleaned
    else:
        erased = _erase(envelope, ordered)
        new_body = body if erased == envelope else json.dumps(erased).encode()
    if new_body == body:
        return None
    # The signature was over the personal data; it can no longer verify anything.
    kept = {k: v for k, v in (headers or {}).items() if k != SIGNATURE_HEADER}
    return new_body, kept


def _erase_events(
    factory: sessionmaker[Session],
    webhook_ids: Sequence[str],
    strings: set[str],
    *,
    dry_run: bool,
    batch_size: int,
) -> TableCount:
    count = TableCount()
    for start in range(0, len(webhook_ids), batch_size):
        chunk = webhook_ids[start : start + batch_size]
        done = _in_transaction_retried(
            factory, partial(_erase_event_rows, chunk=chunk, strings=strings, dry_run=dry_run)
        )
        count.rows += done.rows
        count.changed += done.changed
    return count


def _erase_event_rows(
    session: Session, *, chunk: Sequence[str], strings: set[str], dry_run: bool
) -> TableCount:
    count = TableCount()
    for webhook_id, kept in _stored_events(session, chunk, lock=not dry_run).items():
        count.rows += 1
        erased = erase_body(kept.body, kept.headers, strings)
        if erased is None:
            continue
        count.changed += 1
        if not dry_run:
            _store_erased(session, webhook_id, kept, erased)
    return count


class _Kept(NamedTuple):
    """Where an event's body is kept, and what it is."""

    received_at: datetime
    in_row: bool  # in its `webhook_events` row; else in its day's partition
    body: bytes | None
    headers: dict[str, str] | None


def _stored_events(session: Session, webhook_ids: Sequence[str], lock: bool) -> dict[str, _Kept]:
    """These events' bodies and headers, from their rows or their days' partitions; with
    `lock`, their rows locked (`FOR UPDATE`) until the transaction ends."""
    ev = WebhookEvent
    query = select(ev.webhook_id, ev.received_at, ev.body, ev.headers).where(
        ev.webhook_id.in_(webhook_ids)
    )
    if lock:
        query = query.with_for_update()
    rows = session.execute(query).all()
    found = stored(session, [(r.webhook_id, r.received_at) for r in rows if r.body is None])
    out: dict[str, _Kept] = {}
    for r in rows:
        if r.body is not None:
            out[r.webhook_id] = _Kept(r.received_at, True, r.body, r.headers)
        else:
            out[r.webhook_id] = _Kept(r.received_at, False, *found.get(r.webhook_id, (None, None)))
    return out


def _store_erased(
    session: Session,
    webhook_id: str,
    kept: _Kept,
    erased: tuple[bytes | None, dict[str, str] | None],
) -> None:
    """The erased body and headers replace the old ones where they are kept: the event's row,
    or its day's partition (rewritten in place: the drop of its day removes it in time)."""
    ev = WebhookEvent
    values: dict[str, Any] = {"erased_at": utcnow()}
    if kept.in_row:
        values.update(body=erased[0], headers=erased[1])
    else:
        replace_stored(session, webhook_id, kept.received_at, *erased)
    session.execute(update(ev).where(ev.webhook_id == webhook_id).values(values))


# An erasure locks rows that a worker's batch (or a purge batch) may be locking in another
# order: PostgreSQL then ends one of the two transactions as a deadlock. The worker's retries
# on its own; the erasure and the purge do too, a few times, rather than fail the operator's
# request.
_LOCK_RETRIES = 5


def _in_transaction_retried(factory: sessionmaker[Session], work: Callable[[Session], T]) -> T:
    for attempt in range(1, _LOCK_RETRIES + 1):
        try:
            with transaction(factory) as session:
                return work(session)
        except DBAPIError as exc:
            lost = isinstance(exc.orig, DeadlockDetected | SerializationFailure)
            if not lost or attempt == _LOCK_RETRIES:
                raise
            time.sleep(0.05 * attempt)
    raise AssertionError("unreachable")


def _erase_table(
    factory: sessionmaker[Session],
    table: PersonalTable,
    scope: Scope,
    strings: set[str],
    *,
    dry_run: bool,
) -> TableCount:
    return _in_transaction_retried(
        factory, lambda session: erase_rows(session, table, scope, strings, dry_run=dry_run)
    )


def erase_rows(
    session: Session,
    table: PersonalTable,
    scope: Scope,
    strings: Iterable[str],
    *,
    dry_run: bool = False,
) -> TableCount:
    """Erase the scope's rows of one table in the caller's transaction, locked meanwhile."""
    count = TableCount()
    model = table.model
    keys = [str(c.key) for c in inspect(model).primary_key]
    columns = (*table.json_columns, *table.text_columns)
    ordered = sorted(set(strings), key=len, reverse=True)
    query = select(*(getattr(model, k) for k in keys), *(getattr(model, c) for c in columns))
    query = query.where(table.rows(scope))
    if not dry_run:
        query = query.with_for_update()
    for row in session.execute(query).all():
        count.rows += 1
        key, values = row[: len(keys)], row[len(keys) :]
        changes: dict[str, Any] = {}
        for name, value in zip(columns, values, strict=True):
            if name in table.json_columns:
                new = _erase(value, ordered)
            else:
                new = _scrub_text(value, ordered) if isinstance(value, str) else value
            if new != value:
                changes[name] = new
        if not changes:
            continue
        count.changed += 1
        if not dry_run:
            session.execute(
                update(model)
                .where(*(getattr(model, k) == v for k, v in zip(keys, key, strict=True)))
                .values(**changes)
            )
    return count


def erase_on_apply(session: Session, webhook_id: str, customer_id: str) -> None:
    """An event of an erased customer, just applied: erase it and what it wrote, in the
    applying transaction (which holds the event's and the record's row locks already)."""
    kept = _stored_events(session, [webhook_id], lock=False)[webhook_id]
    envelope = load_body(kept.body)
    strings = personal_strings(envelope)
    scope = Scope(customer_id, webhook_ids={webhook_id})
    scope.payment_ids.update(
        session.scalars(select(Payment.payment_id).where(Payment.customer_id == customer_id))
    )
    payment = payment_of(envelope)
    if payment is not None:
        scope.payment_ids.add(payment)
    erased = erase_body(kept.body, kept.headers, strings)
    if erased is not None:
        _store_erased(session, webhook_id, kept, erased)
    for table in PERSONAL_TABLES:
        erase_rows(session, table, scope, strings)
    _erase_deferred_changes(session, scope, strings)


def _erase_deferred_changes(session: Session, scope: Scope, strings: set[str]) -> None:
    """A drain's batch writes its changes at its end (shared/changes.py `defer_changes`):
    the customer's among those kept so far are erased before they are written."""
    theirs = [
        row
        for row in session.info.get(DEFERRED, [])
        if row["customer_id"] == scope.customer_id
        or row["entity_id"] in scope.payment_ids
        or row["cause_webhook_id"] in scope.webhook_ids
    ]
    for row in theirs:
        strings = strings | personal_strings(row["before"]) | personal_strings(row["after"])
    for row in theirs:
        row["before"] = None if row["before"] is None else erase_json(row["before"], strings)
        row["after"] = erase_json(row["after"], strings)


def list_erasures(session: Session, customer_id: str | None = None) -> list[CustomerErasure]:
    query = select(CustomerErasure).order_by(CustomerErasure.id)
    if customer_id is not None:
        query = query.where(CustomerErasure.customer_id == customer_id)
    return list(session.scalars(query))
