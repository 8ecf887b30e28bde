"""The PostgreSQL schema: the durable event record and the read model the merchant queries."""

from __future__ import annotations

import enum
from datetime import date, datetime
from decimal import Decimal
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Text,
    inspect,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, MappedColumn, mapped_column
from sqlalchemy.types import TypeDecorator, TypeEngine

from shared.db import UTCDateTime, utcnow

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class ExactDecimal(TypeDecorator[Decimal]):
    """NUMERIC on PostgreSQL; text on SQLite, whose NUMERIC is a float in disguise."""

    impl = Numeric
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(80))
        return dialect.type_descriptor(Numeric(asdecimal=True))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        return str(value) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        return None if value is None else Decimal(str(value))


class EventStatus(enum.StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    PROCESSED = "processed"
    RETRYING = "retrying"
    DEAD = "dead"
    IGNORED = "ignored"


class Outcome(enum.StrEnum):
    APPLIED = "applied"
    SUPERSEDED = "superseded"


FINAL_STATUSES = (EventStatus.PROCESSED, EventStatus.IGNORED, EventStatus.DEAD)


class WebhookEvent(Base):
    """One delivery id, recorded before the acknowledgement; the unit of exactly-once."""

    __tablename__ = "webhook_events"

    webhook_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    type: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16), default=EventStatus.PENDING)
    outcome: Mapped[str | None] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    # Both NULL once purged (RETENTION_DAYS, shared/lifecycle.py): the row and its id stay.
    body: Mapped[bytes | None] = mapped_column(LargeBinary)
    headers: Mapped[dict[str, str] | None] = mapped_column(JSON)
    # Seconds from the signed `webhook-timestamp` header: the first ordering tie-breaker.
    webhook_ts: Mapped[int] = mapped_column(BigInteger)
    # The envelope `timestamp`: when the event occurred at Dodo.
    event_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    processed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Data lifecycle (shared/lifecycle.py): when the body and headers were purged, and when
    # a customer's erasure rewrote them without the personal data.
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    erased_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Whose the event is (shared/envelope.py `event_subjects`), written when it is recorded,
    # so an erasure finds a customer's events by index. Both NULL for an event that names
    # neither, and for rows recorded before migration 0006: the erasure scans those bodies.
    customer_id: Mapped[str | None] = mapped_column(String(255), index=True)
    payment_id: Mapped[str | None] = mapped_column(String(255))

    __table_args__ = (
        Index("ix_webhook_events_status_received_at", "status", "received_at"),
        Index("ix_webhook_events_type", "type"),
        # The console's event list pages by keyset, newest first (migration 0002_console).
        Index("ix_webhook_events_received_at_webhook_id", "received_at", "webhook_id"),
        # The erasure looks events up by payment only where they name no customer (disputes):
        # a payment event names its customer and is found by that, so it needs no entry.
        Index(
            "ix_webhook_events_payment_id",
            "payment_id",
            postgresql_where=text("customer_id IS NULL"),
            sqlite_where=text("customer_id IS NULL"),
        ),
    )

    def summary(self) -> dict[str, Any]:
        """The event as `GET /api/events/<id>` and `dlq list --json` show it (DESIGN.md)."""
        return {
            "webhook_id": self.webhook_id,
            "type": self.type,
            "status": self.status,
            "outcome": self.outcome,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "received_at": isoformat(self.received_at),
            "processed_at": isoformat(self.processed_at),
        }

    def detail(self) -> dict[str, Any]:
        """The summary with what was delivered: for looking at a dead letter."""
        return {
            **self.summary(),
            "event_at": isoformat(self.event_at),
            "webhook_ts": self.webhook_ts,
            "headers": self.headers,
            "body": None if self.body is None else self.body.decode("utf-8", errors="replace"),
            "purged_at": isoformat(self.purged_at),
            "erased_at": isoformat(self.erased_at),
        }


def isoformat(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def jsonable(value: Any) -> Any:
    """A column's value as the API writes it: datetimes in ISO 8601, decimals as strings."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value


class SnapshotMixin:
    """The event whose state a snapshot row holds, and the order key that protects it."""

    last_event_type: Mapped[str] = mapped_column(String(255))
    last_event_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_webhook_ts: Mapped[int] = mapped_column(BigInteger)
    last_webhook_id: Mapped[str] = mapped_column(String(255))
    # Dodo's own object as last delivered, so the API can answer with all of its fields.
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    # The family's history table, for those that keep every state (disputes, subscriptions).
    history: ClassVar[type[HistoryMixin] | None] = None

    @classmethod
    def record_columns(cls) -> tuple[str, ...]:
        """The record's own columns, key first: each is a field of Dodo's object of that name.

        The handlers copy these from the event, the API shows them: a new field is a column
        here, a field of the schema, and a migration.
        """
        return _own_columns(cls, SnapshotMixin)

    def representation(self) -> dict[str, Any]:
        """The record as the API shows it, without `last_event`: Dodo's object as last
        delivered, overlaid with the columns."""
        view: dict[str, Any] = dict(self.data)
        for name in self.record_columns():
            view[name] = jsonable(getattr(self, name))
        return view

    def last_event(self) -> dict[str, Any]:
        return {
            "type": self.last_event_type,
            "timestamp": isoformat(self.last_event_at),
            "webhook_id": self.last_webhook_id,
        }


_COLUMNS: dict[type[Any], tuple[str, ...]] = {}


def _own_columns(model: type[Any], mixin: type[Any]) -> tuple[str, ...]:
    """The mapped table's columns but those `mixin` brings, worked out once per model."""
    held = _COLUMNS.get(model)
    if held is None:
        inherited = {name for name, value in vars(mixin).items() if isinstance(value, MappedColumn)}
        columns = inspect(model).local_table.columns
        held = _COLUMNS[model] = tuple(c.key for c in columns if c.key not in inherited)
    return held


class HistoryMixin:
    """One row per distinct event of an entity, kept whatever order they arrived in.

    Its other columns are fields of Dodo's object, copied from each event.
    """

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    webhook_id: Mapped[str] = mapped_column(String(255), unique=True)
    type: Mapped[str] = mapped_column(String(255))
    event_at: Mapped[datetime] = mapped_column(UTCDateTime)
    webhook_ts: Mapped[int] = mapped_column(BigInteger)

    @classmethod
    def event_columns(cls) -> tuple[str, ...]:
        """The columns taken from Dodo's object (the rest describe the delivery)."""
        return _own_columns(cls, HistoryMixin)

    def step(self, entity_key: str) -> dict[str, Any]:
        """One step of the API's `history`: the object's fields but its key, the event's type
        and time."""
        return {
            **{
                name: jsonable(getattr(self, name))
                for name in self.event_columns()
                if name != entity_key
            },
            "type": self.type,
            "timestamp": isoformat(self.event_at),
            "webhook_id": self.webhook_id,
        }


class Payment(SnapshotMixin, Base):
    __tablename__ = "payments"

    payment_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    status: Mapped[str | None] = mapped_column(String(64))
    total_amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(16))
    customer_id: Mapped[str | None] = mapped_column(String(255), index=True)
    subscription_id: Mapped[str | None] = mapped_column(String(255), index=True)
    refund_status: Mapped[str | None] = mapped_column(String(64))


class Refund(SnapshotMixin, Base):
    __tablename__ = "refunds"

    refund_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    payment_id: Mapped[str] = mapped_column(String(255), index=True)
    status: Mapped[str] = mapped_column(String(64))
    amount: Mapped[int | None] = mapped_column(BigInteger)
    currency: Mapped[str | None] = mapped_column(String(16))


class DisputeHistory(HistoryMixin, Base):
    """Every status a dispute went through."""

    __tablename__ = "dispute_history"

    dispute_id: Mapped[str] = mapped_column(String(255), index=True)
    dispute_status: Mapped[str] = mapped_column(String(64))
    dispute_stage: Mapped[str] = mapped_column(String(64))


class Dispute(SnapshotMixin, Base):
    __tablename__ = "disputes"
    history = DisputeHistory

    dispute_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    payment_id: Mapped[str] = mapped_column(String(255), index=True)
    dispute_status: Mapped[str] = mapped_column(String(64))
    dispute_stage: Mapped[str] = mapped_column(String(64))
    amount: Mapped[Decimal] = mapped_column(ExactDecimal)
    currency: Mapped[str] = mapped_column(String(16))


class SubscriptionHistory(HistoryMixin, Base):
    """Every subscription event: renewals, holds, plan changes, cancellation."""

    __tablename__ = "subscription_history"

    subscription_id: Mapped[str] = mapped_column(String(255), index=True)
    status: Mapped[str] = mapped_column(String(64))
    product_id: Mapped[str] = mapped_column(String(255))
    quantity: Mapped[int] = mapped_column(Integer)


class Subscription(SnapshotMixin, Base):
    __tablename__ = "subscriptions"
    history = SubscriptionHistory

    subscription_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    status: Mapped[str] = mapped_column(String(64))
    product_id: Mapped[str] = mapped_column(String(255))
    quantity: Mapped[int] = mapped_column(Integer)
    customer_id: Mapped[str | None] = mapped_column(String(255), index=True)
    next_billing_date: Mapped[datetime | None] = mapped_column(UTCDateTime)
    previous_billing_date: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancel_at_next_billing_date: Mapped[bool] = mapped_column(Boolean, default=False)
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class LicenseKey(SnapshotMixin, Base):
    __tablename__ = "license_keys"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    key: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(64))
    customer_id: Mapped[str] = mapped_column(String(255), index=True)
    product_id: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


ENTRY_AMOUNTS = (
    "amount",
    "balance_before",
    "balance_after",
    "overage_before",
    "overage_after",
)


class CreditEntry(Base):
    """A credit ledger entry, held once by its Dodo id whatever delivery brought it."""

    __tablename__ = "credit_entries"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(255))
    credit_entitlement_id: Mapped[str] = mapped_column(String(255))
    transaction_type: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[str] = mapped_column(String(255))
    is_credit: Mapped[bool] = mapped_column(Boolean)
    amount: Mapped[Decimal] = mapped_column(ExactDecimal)
    balance_before: Mapped[Decimal] = mapped_column(ExactDecimal)
    balance_after: Mapped[Decimal] = mapped_column(ExactDecimal)
    overage_before: Mapped[Decimal] = mapped_column(ExactDecimal)
    overage_after: Mapped[Decimal] = mapped_column(ExactDecimal)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    webhook_id: Mapped[str] = mapped_column(String(255))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)

    def representation(self) -> dict[str, Any]:
        """The entry as the ledger API lists it."""
        return {
            "id": self.id,
            "type": self.event_type,
            "transaction_type": self.transaction_type,
            "is_credit": self.is_credit,
            **{name: jsonable(getattr(self, name)) for name in ENTRY_AMOUNTS},
            "created_at": isoformat(self.created_at),
            "webhook_id": self.webhook_id,
        }

    __table_args__ = (
        Index(
            "ix_credit_entries_account_created",
            "customer_id",
            "credit_entitlement_id",
            "created_at",
        ),
    )


class CreditBalance(Base):
    """Per (customer, entitlement): the balance derived from the ledger, and the latest alert."""

    __tablename__ = "credit_balances"

    customer_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    credit_entitlement_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    balance: Mapped[Decimal | None] = mapped_column(ExactDecimal)
    overage: Mapped[Decimal | None] = mapped_column(ExactDecimal)
    chain_ok: Mapped[bool] = mapped_column(Boolean, default=True)
    last_entry_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_entry_id: Mapped[str | None] = mapped_column(String(255))
    entry_count: Mapped[int] = mapped_column(Integer, default=0)
    alert_available_balance: Mapped[Decimal | None] = mapped_column(ExactDecimal)
    alert_threshold_percent: Mapped[int | None] = mapped_column(Integer)
    alert_threshold_amount: Mapped[Decimal | None] = mapped_column(ExactDecimal)
    alert_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    alert_webhook_ts: Mapped[int | None] = mapped_column(BigInteger)
    alert_webhook_id: Mapped[str | None] = mapped_column(String(255))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    def representation(self) -> dict[str, Any]:
        """The account as `/api/customers/<id>/credits` lists it; amounts as decimal strings."""
        alert = None
        if self.alert_at is not None:
            alert = {
                "available_balance": jsonable(self.alert_available_balance),
                "threshold_percent": self.alert_threshold_percent,
                "threshold_amount": jsonable(self.alert_threshold_amount),
                "timestamp": isoformat(self.alert_at),
            }
        return {
            "credit_entitlement_id": self.credit_entitlement_id,
            "balance": jsonable(self.balance),
            "overage": jsonable(self.overage),
            "chain_ok": self.chain_ok,
            "last_entry_at": isoformat(self.last_entry_at),
            "entry_count": self.entry_count,
            "low_balance_alert": alert,
        }


class ReconcileRun(Base):
    """One reconciliation against Dodo's API: when, what it found, what it recorded.

    Written by `dodo-webhooks reconcile` (not with `--dry-run`) and beat's periodic run; the
    ingest's /metrics reads the latest.
    """

    __tablename__ = "reconcile_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    trigger: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    families: Mapped[str] = mapped_column(String(255))
    listed: Mapped[int] = mapped_column(Integer, default=0)
    missing: Mapped[int] = mapped_column(Integer, default=0)
    differs: Mapped[int] = mapped_column(Integer, default=0)
    recorded: Mapped[int] = mapped_column(Integer, default=0)
    malformed: Mapped[int] = mapped_column(Integer, default=0)
    api_calls: Mapped[int] = mapped_column(Integer, default=0)
    # Per family: {listed, missing, differs, recorded, malformed}.
    counts: Mapped[dict[str, Any]] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_reconcile_runs_started_at", "started_at"),)


class EventBody(Base):
    """A delivery's raw body and headers, as the ingest received them, apart from its event row.

    On PostgreSQL the table is partitioned by the day it was stored (UTC), so that retention
    drops a whole day of bodies instead of rewriting rows (shared/bodies.py, migration 0008):
    nothing is written per body, and the space goes back to the operating system. A body
    that must outlive its day (a dead letter, an event finished late, an erased one) is
    copied into `webhook_events.body`, which wins where both are set. SQLite (the dev server)
    keeps bodies in the event row, as before: this table stays empty there.
    """

    __tablename__ = "event_bodies"

    webhook_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    # The event's `received_at`, exactly: the partition key, and how a lookup finds its day.
    stored_at: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    body: Mapped[bytes | None] = mapped_column(LargeBinary)
    headers: Mapped[dict[str, str] | None] = mapped_column(JSON)

    __table_args__ = ({"postgresql_partition_by": "RANGE (stored_at)"},)


class PurgedDay(Base):
    """A day of bodies the purge dropped (shared/bodies.py): when, and how many events and
    bytes went with it. What a purged event's `purged_at` is read from: its row is not
    rewritten."""

    __tablename__ = "purged_days"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    purged_at: Mapped[datetime] = mapped_column(UTCDateTime)
    events: Mapped[int] = mapped_column(BigInteger)
    bytes: Mapped[int] = mapped_column(BigInteger)


# --- Data lifecycle: retention and erasure (shared/lifecycle.py) ---------------------------

# What the purge in place walks: processed and ignored events still holding a body in their
# row, by when processing finished, from the purge's mark on (`lifecycle.PURGE_MARK`: all
# before it are purged). Since migration 0008 those are few on PostgreSQL: rows recorded
# before it, and the bodies a day's drop or a late finish kept in the row (shared/bodies.py);
# the rest keep theirs in `event_bodies` and never enter this index. (Naming `body` makes a
# purge in place a new row version with new index entries, not a HOT update: 0007 had made
# it HOT, when every body was purged in place.)
PURGEABLE = (EventStatus.PROCESSED, EventStatus.IGNORED)
BODY_IN_ROW = WebhookEvent.status.in_([str(s) for s in PURGEABLE]) & WebhookEvent.body.is_not(None)
Index(
    "ix_webhook_events_body_in_row",
    WebhookEvent.processed_at,
    postgresql_where=BODY_IN_ROW,
    sqlite_where=BODY_IN_ROW,
)
# What the erasure still scans body by body: events with neither a customer nor a payment
# recorded (those recorded before migration 0006, and those that name neither); its queries
# add `body IS NOT NULL`. Without it that scan reads the whole table, however few such rows
# are left.
UNATTRIBUTED = WebhookEvent.customer_id.is_(None) & WebhookEvent.payment_id.is_(None)
Index(
    "ix_webhook_events_no_subjects",
    WebhookEvent.received_at,
    postgresql_where=UNATTRIBUTED,
    sqlite_where=UNATTRIBUTED,
)


class LifecycleCounter(Base):
    """Cluster-wide running totals of the purge (`purged_events`, `purged_bytes`), for /metrics,
    and the purge's mark (`purge_mark_us`: every purgeable event processed before it is purged)."""

    __tablename__ = "lifecycle_counters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class CustomerErasure(Base):
    """That a customer's personal data was erased: when, by whom, how many rows; never the data.

    Its presence also tells the workers to erase that customer's events as they apply them.
    """

    __tablename__ = "customer_erasures"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    customer_id: Mapped[str] = mapped_column(String(255), index=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Who asked: "cli:<user>@<host>" or "api".
    requested_by: Mapped[str] = mapped_column(String(255))
    # {table: {"rows": found, "changed": rewritten}}
    counts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "customer_id": self.customer_id,
            "started_at": isoformat(self.started_at),
            "finished_at": isoformat(self.finished_at),
            "requested_by": self.requested_by,
            "counts": self.counts,
        }


# The change feed (DESIGN.md "Change feed"): what changed in the read model, and its delivery.

# SQLite makes only an INTEGER primary key autoincrement; both hold 64 bits.
SEQ = BigInteger().with_variant(Integer(), "sqlite")


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"


class Change(Base):
    """One change of a record's API representation, written with the read-model write."""

    __tablename__ = "changes"

    seq: Mapped[int] = mapped_column(SEQ, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(32))
    entity_id: Mapped[str] = mapped_column(String(600))
    customer_id: Mapped[str | None] = mapped_column(String(255), index=True)
    changed: Mapped[list[str]] = mapped_column(JSON)
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    after: Mapped[dict[str, Any]] = mapped_column(JSON)
    cause_webhook_id: Mapped[str] = mapped_column(String(255))
    cause_type: Mapped[str] = mapped_column(String(255))
    cause_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (Index("ix_changes_entity_seq", "kind", "entity_id", "seq"),)


class OutboundDelivery(Base):
    """One change to one `OUTBOUND_WEBHOOK_URL`: sent in order per URL and entity."""

    __tablename__ = "outbound_deliveries"

    id: Mapped[int] = mapped_column(SEQ, primary_key=True, autoincrement=True)
    change_seq: Mapped[int] = mapped_column(BigInteger)
    change_id: Mapped[str] = mapped_column(String(64), index=True)
    url: Mapped[str] = mapped_column(String(2000))
    kind: Mapped[str] = mapped_column(String(32))
    entity_id: Mapped[str] = mapped_column(String(600))
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Held by the attempt in flight; a worker killed mid-POST leaves it to run out.
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        Index("ix_outbound_deliveries_url_entity", "url", "kind", "entity_id", "change_seq"),
        Index("ix_outbound_deliveries_status_next", "status", "next_attempt_at"),
        # The claim's "is this URL failing, is a POST to it in flight" look only at these
        # few rows; without them each claim read every pending delivery of its URL.
        Index(
            "ix_outbound_deliveries_failing",
            "url",
            postgresql_where=text("status = 'pending' AND last_error IS NOT NULL"),
            sqlite_where=text("status = 'pending' AND last_error IS NOT NULL"),
        ),
        Index(
            "ix_outbound_deliveries_in_flight",
            "url",
            "lease_until",
            postgresql_where=text("status = 'pending' AND lease_until IS NOT NULL"),
            sqlite_where=text("status = 'pending' AND lease_until IS NOT NULL"),
        ),
    )


class OutboundAttempt(Base):
    """One POST of a delivery: its answer's status and first bytes, or its error."""

    __tablename__ = "outbound_attempts"

    id: Mapped[int] = mapped_column(SEQ, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(BigInteger, index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    duration_ms: Mapped[float] = mapped_column(Numeric(asdecimal=False))
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    response_head: Mapped[str | None] = mapped_column(Text)
