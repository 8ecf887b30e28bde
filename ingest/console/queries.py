"""The console's reads: each one indexed, each page bounded, so a million events stay fast.

Lists page by keyset — (received_at, webhook_id), newest first — so a page never shifts
when new events arrive, and no query counts or sorts the whole inbox.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Select, func, select, tuple_, union
from sqlalchemy.orm import Session

from ingest.records import RECORDS, ledger_entries, record_view
from shared.bodies import fill
from shared.catalog import KIND_OF
from shared.db import utcnow
from shared.deadletters import FilterError, glob_to_like, make_filter, parse_when
from shared.ledger import ChainLink
from shared.models import (
    FINAL_STATUSES,
    CreditBalance,
    CreditEntry,
    Dispute,
    EventStatus,
    LicenseKey,
    Payment,
    Refund,
    SnapshotMixin,
    Subscription,
    WebhookEvent,
)

PAGE_SIZE = 50
CUSTOMER_ROWS = 100
CHART_HOURS = 24
NOT_FINAL = tuple(str(s) for s in EventStatus if s not in FINAL_STATUSES)

# A record family's console path segment -> its model (the admin API's segments).
FAMILY_OF_MODEL: dict[type[SnapshotMixin], str] = {
    model: seg for seg, (model, _) in RECORDS.items()
}


# ---------------------------------------------------------------- keyset cursor


@dataclass(frozen=True)
class Cursor:
    """The last row of a page: the next page starts strictly below it."""

    received_at: datetime
    webhook_id: str

    def encode(self) -> str:
        raw = json.dumps([self.received_at.isoformat(), self.webhook_id]).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str | None) -> Cursor | None:
        if not text:
            return None
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            at, webhook_id = json.loads(raw)
            when = datetime.fromisoformat(at)
        except (binascii.Error, ValueError, TypeError):
            raise FilterError("before: not a page cursor of this console") from None
        if not isinstance(webhook_id, str):
            raise FilterError("before: not a page cursor of this console")
        return cls(when if when.tzinfo else when.replace(tzinfo=UTC), webhook_id)


@dataclass
class Page:
    events: list[WebhookEvent]
    next: Cursor | None


def _page(session: Session, query: Select[Any], before: Cursor | None) -> Page:
    ev = WebhookEvent
    if before is not None:
        query = query.where(
            tuple_(ev.received_at, ev.webhook_id) < tuple_(before.received_at, before.webhook_id)
        )
    rows: list[WebhookEvent] = list(
        session.scalars(
            query.order_by(ev.received_at.desc(), ev.webhook_id.desc()).limit(PAGE_SIZE + 1)
        )
    )
    more = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    cursor = Cursor(rows[-1].received_at, rows[-1].webhook_id) if more else None
    return Page(rows, cursor)


# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class EventFilter:
    status: str | None = None
    type_glob: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    @classmethod
    def parse(
        cls, *, status: str | None, type_glob: str | None, since: str | None, until: str | None
    ) -> EventFilter:
        if status and status not in {str(s) for s in EventStatus}:
            raise FilterError(f"status: {status!r} is not one of {', '.join(EventStatus)}")
        start = parse_when(since or None, name="since")
        end = parse_when(until or None, name="until")
        if start and end and start >= end:
            raise FilterError("since is not before until")
        glob = (type_glob or "").strip() or None
        if glob and len(glob) > 255:
            raise FilterError("type: longer than 255 characters")
        return cls(status or None, glob, start, end)

    def where(self) -> list[ColumnElement[bool]]:
        ev = WebhookEvent
        clauses: list[ColumnElement[bool]] = []
        if self.status:
            clauses.append(ev.status == self.status)
        if self.type_glob:
            clauses.append(ev.type.like(glob_to_like(self.type_glob), escape="\\"))
        if self.since:
            clauses.append(ev.received_at >= self.since)
        if self.until:
            clauses.append(ev.received_at < self.until)
        return clauses


def list_events(session: Session, selection: EventFilter, before: Cursor | None) -> Page:
    return _page(session, select(WebhookEvent).where(*selection.where()), before)


def list_dead_letters(
    session: Session,
    *,
    type_glob: str | None,
    since: str | None,
    until: str | None,
    before: Cursor | None,
) -> tuple[Page, int]:
    """A page of dead letters (the admin API's filters, shared/deadletters.py) and the total."""
    selection = make_filter(type_glob=type_glob or None, since=since or None, until=until or None)
    where = selection.where()
    total = int(session.scalar(select(func.count()).select_from(WebhookEvent).where(*where)) or 0)
    return _page(session, select(WebhookEvent).where(*where), before), total


# ---------------------------------------------------------------- overview


@dataclass
class Overview:
    by_status: dict[str, int]
    oldest_pending: datetime | None
    dead_by_type: list[tuple[str, int]]
    # One (hour, received, dead now) per hour of the last CHART_HOURS, oldest first.
    hours: list[tuple[datetime, int, int]]

    @property
    def total(self) -> int:
        return sum(self.by_status.values())

    @property
    def oldest_pending_seconds(self) -> float | None:
        if self.oldest_pending is None:
            return None
        return max(0.0, (utcnow() - self.oldest_pending).total_seconds())


def _hour_bucket(session: Session) -> ColumnElement[Any]:
    if session.get_bind().dialect.name == "postgresql":
        return func.date_trunc("hour", WebhookEvent.received_at)
    return func.strftime("%Y-%m-%dT%H:00:00+00:00", WebhookEvent.received_at)


def overview(session: Session) -> Overview:
    ev = WebhookEvent
    by_status = {str(s): 0 for s in EventStatus}
    for status, count in session.execute(select(ev.status, func.count()).group_by(ev.status)):
        by_status[status] = int(count)
    oldest = session.scalar(select(func.min(ev.received_at)).where(ev.status.in_(NOT_FINAL)))
    dead_by_type = [
        (event_type or "(no type)", int(count))
        for event_type, count in session.execute(
            select(ev.type, func.count())
            .where(ev.status == EventStatus.DEAD)
            .group_by(ev.type)
            .order_by(func.count().desc(), ev.type)
        )
    ]
    now = utcnow().replace(minute=0, second=0, microsecond=0)
    start = now - timedelta(hours=CHART_HOURS - 1)
    bucket = _hour_bucket(session)
    counted: dict[datetime, tuple[int, int]] = {}
    for hour, received, dead in session.execute(
        select(
            bucket,
            func.count(),
            func.count().filter(ev.status == EventStatus.DEAD),
        )
        .where(ev.received_at >= start)
        .group_by(bucket)
    ):
        when = hour if isinstance(hour, datetime) else datetime.fromisoformat(hour)
        counted[when.astimezone(UTC)] = (int(received), int(dead))
    hours = [
        (start + timedelta(hours=i), *counted.get(start + timedelta(hours=i), (0, 0)))
        for i in range(CHART_HOURS)
    ]
    return Overview(by_status, oldest, dead_by_type, hours)


# ---------------------------------------------------------------- one event


@dataclass
class Touched:
    """A record an event is about, and whether the record holds this event's state."""

    label: str
    family: str | None
    record_id: str
    exists: bool
    holds_this_event: bool | None = None
    customer_id: str | None = None


@dataclass
class EventPage:
    event: WebhookEvent
    body_text: str
    pretty: bool
    touched: list[Touched] = field(default_factory=list)
    customer_id: str | None = None


def _data(body: bytes | None) -> tuple[str, bool, dict[str, Any]]:
    if body is None:
        return "", False, {}  # purged by the retention (RETENTION_DAYS)
    text = body.decode("utf-8", errors="replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        return text, False, {}
    pretty = json.dumps(parsed, indent=2, ensure_ascii=False, sort_keys=False)
    data = parsed.get("data") if isinstance(parsed, dict) else None
    return pretty, True, data if isinstance(data, dict) else {}


def _customer_of(data: dict[str, Any]) -> str | None:
    customer = data.get("customer")
    if isinstance(customer, dict) and isinstance(customer.get("customer_id"), str):
        return str(customer["customer_id"])
    value = data.get("customer_id")
    return value if isinstance(value, str) else None


_IDENTITY: dict[str, tuple[type[SnapshotMixin], str]] = {
    "payment": (Payment, "payment_id"),
    "refund": (Refund, "refund_id"),
    "dispute": (Dispute, "dispute_id"),
    "subscription": (Subscription, "subscription_id"),
    "license_key": (LicenseKey, "id"),
}


def event_page(session: Session, webhook_id: str) -> EventPage | None:
    event = session.get(WebhookEvent, webhook_id)
    if event is None:
        return None
    fill(session, [event])
    body_text, pretty, data = _data(event.body)
    page = EventPage(event, body_text, pretty, customer_id=_customer_of(data))
    kind = KIND_OF.get(event.type or "")
    if kind in _IDENTITY:
        model, key = _IDENTITY[kind]
        record_id = data.get(key)
        if isinstance(record_id, str):
            row = session.get(model, record_id)
            page.touched.append(
                Touched(
                    label=model.__name__.lower().replace("licensekey", "license key"),
                    family=FAMILY_OF_MODEL[model],
                    record_id=record_id,
                    exists=row is not None,
                    holds_this_event=None if row is None else row.last_webhook_id == webhook_id,
                )
            )
        for linked, label in (("payment_id", "payment"), ("subscription_id", "subscription")):
            other = data.get(linked)
            if key != linked and isinstance(other, str):
                target = Payment if label == "payment" else Subscription
                page.touched.append(
                    Touched(
                        label=label,
                        family=FAMILY_OF_MODEL[target],
                        record_id=other,
                        exists=session.get(target, other) is not None,
                    )
                )
    elif kind in ("credit_entry", "credit_balance_low"):
        entitlement = data.get("credit_entitlement_id")
        customer = data.get("customer_id")
        if isinstance(entitlement, str) and isinstance(customer, str):
            entry_id = data.get("id") if kind == "credit_entry" else None
            held = session.get(CreditEntry, entry_id) if isinstance(entry_id, str) else None
            page.touched.append(
                Touched(
                    label="credit balance",
                    family=None,
                    record_id=entitlement,
                    exists=session.get(CreditBalance, (customer, entitlement)) is not None,
                    holds_this_event=None if held is None else held.webhook_id == webhook_id,
                    customer_id=customer,
                )
            )
    return page


# ---------------------------------------------------------------- records and customers


def record_page(session: Session, family: str, record_id: str) -> dict[str, Any] | None:
    model, _ = RECORDS[family]
    row = session.get(model, record_id)
    return None if row is None else record_view(session, row)


@dataclass
class Account:
    balance: dict[str, Any]
    ledger: list[dict[str, Any]]


@dataclass
class CustomerPage:
    customer_id: str
    subscriptions: list[dict[str, Any]]
    payments: list[dict[str, Any]]
    refunds: list[dict[str, Any]]
    disputes: list[dict[str, Any]]
    license_keys: list[dict[str, Any]]
    accounts: list[Account]

    @property
    def empty(self) -> bool:
        return not (self.subscriptions or self.payments or self.license_keys or self.accounts)


def _views(session: Session, rows: Sequence[SnapshotMixin]) -> list[dict[str, Any]]:
    return [record_view(session, row) for row in rows]


def customer_page(session: Session, customer_id: str) -> CustomerPage | None:
    """What is known of a customer, newest first, at most CUSTOMER_ROWS of each kind."""
    newest = (Payment.last_event_at.desc(),)
    payments = session.scalars(
        select(Payment)
        .where(Payment.customer_id == customer_id)
        .order_by(*newest)
        .limit(CUSTOMER_ROWS)
    ).all()
    payment_ids = select(Payment.payment_id).where(Payment.customer_id == customer_id)
    refunds = session.scalars(
        select(Refund)
        .where(Refund.payment_id.in_(payment_ids))
        .order_by(Refund.last_event_at.desc())
        .limit(CUSTOMER_ROWS)
    ).all()
    disputes = session.scalars(
        select(Dispute)
        .where(Dispute.payment_id.in_(payment_ids))
        .order_by(Dispute.last_event_at.desc())
        .limit(CUSTOMER_ROWS)
    ).all()
    subscriptions = session.scalars(
        select(Subscription)
        .where(Subscription.customer_id == customer_id)
        .order_by(Subscription.last_event_at.desc())
        .limit(CUSTOMER_ROWS)
    ).all()
    license_keys = session.scalars(
        select(LicenseKey)
        .where(LicenseKey.customer_id == customer_id)
        .order_by(LicenseKey.last_event_at.desc())
        .limit(CUSTOMER_ROWS)
    ).all()
    balances = session.scalars(
        select(CreditBalance)
        .where(CreditBalance.customer_id == customer_id)
        .order_by(CreditBalance.credit_entitlement_id)
    ).all()
    accounts = [
        Account(b.representation(), ledger(session, customer_id, b.credit_entitlement_id))
        for b in balances
    ]
    page = CustomerPage(
        customer_id,
        _views(session, subscriptions),
        _views(session, payments),
        _views(session, refunds),
        _views(session, disputes),
        _views(session, license_keys),
        accounts,
    )
    return None if page.empty else page


def ledger(session: Session, customer_id: str, entitlement_id: str) -> list[dict[str, Any]]:
    """The account's entries in ledger order (the order the balance is derived in), each
    marked whether it starts where the one before it ended."""
    shown = []
    previous: ChainLink | None = None
    for entry in ledger_entries(session, customer_id, entitlement_id):
        link = ChainLink.of(entry)
        shown.append(
            {
                **entry.representation(),
                "links": previous is None or previous.after == link.before,
            }
        )
        previous = link
    return shown


def customers(session: Session, after: str | None) -> tuple[list[str], str | None]:
    """Known customers in id order, a page at a time (each table's customer index, merged)."""
    columns = (
        Payment.customer_id,
        Subscription.customer_id,
        LicenseKey.customer_id,
        CreditBalance.customer_id,
    )
    parts = []
    for column in columns:
        part = select(column.label("customer_id")).where(column.is_not(None))
        if after:
            part = part.where(column > after)
        parts.append(part.distinct().order_by(column).limit(PAGE_SIZE + 1))
    merged = union(*(p.subquery().select() for p in parts)).subquery()
    ids = list(
        session.scalars(
            select(merged.c.customer_id).order_by(merged.c.customer_id).limit(PAGE_SIZE + 1)
        )
    )
    more = len(ids) > PAGE_SIZE
    ids = ids[:PAGE_SIZE]
    return ids, (ids[-1] if more else None)


# ---------------------------------------------------------------- search


@dataclass(frozen=True)
class Found:
    what: str
    key: str
    endpoint: str
    args: tuple[tuple[str, str], ...]

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.args)


def search(session: Session, query: str) -> list[Found]:
    """Every page the id names: an event, a record of any family, a customer."""
    found: list[Found] = []
    if session.get(WebhookEvent, query) is not None:
        found.append(Found("event", query, "console.event", (("webhook_id", query),)))
    for segment, (model, what) in RECORDS.items():
        if session.get(model, query) is not None:
            found.append(
                Found(what, query, "console.record", (("family", segment), ("record_id", query)))
            )
    if customer_is_known(session, query):
        found.append(Found("customer", query, "console.customer", (("customer_id", query),)))
    return found


def customer_is_known(session: Session, customer_id: str) -> bool:
    for column in (
        Payment.customer_id,
        Subscription.customer_id,
        LicenseKey.customer_id,
        CreditBalance.customer_id,
    ):
        if session.scalar(select(column).where(column == customer_id).limit(1)) is not None:
            return True
    return False
