"""The change feed: a change recorded with the read-model write, read back, and its deliveries.

The one place that knows a change's JSON shape (DESIGN.md "Change feed") and how the feed
and the outbound deliveries are queried: the workers write through `record_change` and
`fan_out`, the admin API, the CLI and the console read through the rest.

Why a reader paging with `after=next_after` never skips a change: PostgreSQL hands out
sequence values in call order, not commit order, so a transaction that took seq 5 and
commits after another that took seq 6 would be skipped by a reader that saw 6 first. Here a
transaction takes the feed's transaction-level advisory lock before it takes a seq, and
holds it until it commits (PostgreSQL makes a commit visible before it releases its locks).
At any moment at most one transaction holds an uncommitted seq, and it is larger than every
committed one, so the committed changes always form a prefix of the seq order. The lock is
taken at the very end of the apply transaction (after every row lock it needs), so the
commits it serialises are short and it cannot take part in a deadlock. A drain's batch
applies many events in one transaction: it defers their changes (`defer_changes`) and writes
them all at its end (`write_deferred`), so the lock covers those inserts and the commit, not
the batch's whole work; otherwise two drains would apply one batch at a time. SQLite (dev mode)
has a single writer, which gives the same.

The price: a worker frozen (SIGSTOP, a paused VM) inside that short window holds every
other change-writing commit until PostgreSQL ends its idle transaction
(`idle_in_transaction_session_timeout`, half of LEASE_SECONDS, workers/engine.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, cast

from sqlalchemy import Table, func, insert, or_, select, text, update
from sqlalchemy.orm import Session

from shared.db import utcnow
from shared.models import (
    Change,
    DeliveryStatus,
    OutboundAttempt,
    OutboundDelivery,
    isoformat,
)

CHANGES = cast(Table, Change.__table__)
DELIVERIES = cast(Table, OutboundDelivery.__table__)

KINDS: Final = ("payment", "refund", "dispute", "subscription", "license_key", "credit_balance")
# pg_advisory_xact_lock's key for the feed: b"dodofeed" as a big-endian int64.
FEED_LOCK: Final = int.from_bytes(b"dodofeed", "big", signed=True)
# Where `record_change` leaves what this transaction recorded, for `fan_out`.
RECORDED: Final = "dodo_webhooks.changes"
# While `defer_changes` is on, where `record_change` leaves the changes to write, for
# `write_deferred` at the end of the transaction.
DEFERRED: Final = "dodo_webhooks.deferred_changes"
DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000


class FeedError(ValueError):
    """A filter or a parameter of a feed query that cannot be used, explained in one line."""


@dataclass(frozen=True)
class Cause:
    """The event that caused a change."""

    webhook_id: str
    type: str
    timestamp: datetime


@dataclass(frozen=True)
class RecordedChange:
    seq: int
    id: str
    kind: str
    entity_id: str


def changed_fields(before: dict[str, Any] | None, after: dict[str, Any]) -> list[str]:
    """The sorted top-level names that differ; for a new record, every field of `after`."""
    if before is None:
        return sorted(after)
    names = set(before) | set(after)
    return sorted(n for n in names if n not in before or n not in after or before[n] != after[n])


def change_id(kind: str, entity_id: str, webhook_id: str) -> str:
    """Stable: one event changes one record once, so the same inputs always name one change."""
    digest = hashlib.sha256(f"{kind}\0{entity_id}\0{webhook_id}".encode()).digest()
    return "chg_" + base64.b32encode(digest[:15]).decode().lower()


_INSERT_CHANGE = insert(CHANGES).returning(CHANGES.c.seq)
Run = Callable[[Session, Any, dict[str, Any]], Any]


def _run(session: Session, statement: Any, params: dict[str, Any]) -> Any:
    return session.connection().execute(statement, params)


_FEED_LOCK = text(f"SELECT pg_advisory_xact_lock({FEED_LOCK})")


def record_change(
    session: Session,
    *,
    kind: str,
    entity_id: str,
    customer_id: str | None,
    before: dict[str, Any] | None,
    after: dict[str, Any],
    cause: Cause,
    run: Run | None = None,
) -> RecordedChange | None:
    """Write one change in the caller's transaction if the representation changed.

    Call it last in the transaction, after every other write: the feed lock it takes is
    held until the commit (see the module's docstring). `run` executes a statement in the
    session (the workers pass their prebuilt-statement executor); by default
    `session.connection().execute`. While `defer_changes` is on, the change is only kept,
    for `write_deferred` to write (and None returned).
    """
    if before == after:
        return None
    row = {
        "id": change_id(kind, entity_id, cause.webhook_id),
        "kind": kind,
        "entity_id": entity_id,
        "customer_id": customer_id,
        "changed": changed_fields(before, after),
        "before": before,
        "after": after,
        "cause_webhook_id": cause.webhook_id,
        "cause_type": cause.type,
        "cause_at": cause.timestamp,
        "created_at": utcnow(),
    }
    deferred = session.info.get(DEFERRED)
    if deferred is not None:
        deferred.append(row)
        return None
    return _write(session, [row], run)[0]


def defer_changes(session: Session) -> None:
    """From now on in this transaction, keep changes for `write_deferred` to write."""
    session.info[DEFERRED] = []


def deferred_count(session: Session) -> int:
    return len(session.info.get(DEFERRED, []))


def forget_deferred_since(session: Session, count: int) -> None:
    """After a savepoint's rollback: the changes kept since it are gone with its writes."""
    del session.info.get(DEFERRED, [])[count:]


def write_deferred(session: Session, run: Run | None = None) -> list[RecordedChange]:
    """Write the changes kept since `defer_changes`, under the feed lock; deferral ends."""
    rows: list[dict[str, Any]] = session.info.pop(DEFERRED, None) or []
    return _write(session, rows, run) if rows else []


def _write(session: Session, rows: list[dict[str, Any]], run: Run | None) -> list[RecordedChange]:
    execute = run or _run
    if session.get_bind().dialect.name == "postgresql":
        execute(session, _FEED_LOCK, {})
    recorded = []
    for row in rows:
        seq = execute(session, _INSERT_CHANGE, row).scalar_one()
        recorded.append(RecordedChange(int(seq), row["id"], row["kind"], row["entity_id"]))
    session.info.setdefault(RECORDED, []).extend(recorded)
    return recorded


_INSERT_DELIVERY = insert(DELIVERIES).returning(DELIVERIES.c.id)


def fan_out(session: Session, urls: tuple[str, ...]) -> list[int]:
    """One pending delivery per change this transaction recorded and per URL; their ids."""
    recorded: list[RecordedChange] = session.info.pop(RECORDED, [])
    if not recorded or not urls:
        return []
    now = utcnow()
    conn = session.connection()
    ids = []
    for change in recorded:
        for url in urls:
            ids.append(
                conn.execute(
                    _INSERT_DELIVERY,
                    {
                        "change_seq": change.seq,
                        "change_id": change.id,
                        "url": url,
                        "kind": change.kind,
                        "entity_id": change.entity_id,
                        "status": DeliveryStatus.PENDING,
                        "attempts": 0,
                        "next_attempt_at": now,
                        "created_at": now,
                    },
                ).scalar_one()
            )
    return ids


def change_view(change: Change) -> dict[str, Any]:
    """A change as the pull API lists it and the outbound webhook carries it in `data`."""
    return {
        "id": change.id,
        "seq": change.seq,
        "kind": change.kind,
        "entity_id": change.entity_id,
        "customer_id": change.customer_id,
        "changed": change.changed,
        "before": change.before,
        "after": change.after,
        "cause": {
            "webhook_id": change.cause_webhook_id,
            "type": change.cause_type,
            "timestamp": isoformat(change.cause_at),
        },
        "created_at": isoformat(change.created_at),
    }


def outbound_body(change: Change) -> str:
    """The Standard Webhooks body POSTed for a change."""
    return json.dumps(
        {
            "type": f"{change.kind}.changed",
            "timestamp": isoformat(change.created_at),
            "data": change_view(change),
        },
        separators=(",", ":"),
    )


def parse_int(value: str | None, name: str, *, default: int, low: int, high: int) -> int:
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise FeedError(f"{name} must be an integer, not {value!r}") from None
    if not low <= number <= high:
        raise FeedError(f"{name} must be between {low} and {high}")
    return number


def list_changes(
    session: Session,
    *,
    after: int = 0,
    limit: int = DEFAULT_LIMIT,
    kind: str | None = None,
    entity_id: str | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Changes with `seq > after`, oldest first, and the `next_after` to page on with."""
    if kind is not None and kind not in KINDS:
        raise FeedError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    query = select(Change).where(Change.seq > after)
    if kind is not None:
        query = query.where(Change.kind == kind)
    if entity_id is not None:
        query = query.where(Change.entity_id == entity_id)
    rows = session.scalars(query.order_by(Change.seq).limit(limit)).all()
    return [change_view(row) for row in rows], (rows[-1].seq if rows else after)


def get_change(session: Session, identity: str) -> Change | None:
    return session.scalars(select(Change).where(Change.id == identity)).first()


# Deliveries.


def delivery_view(delivery: OutboundDelivery) -> dict[str, Any]:
    return {
        "id": delivery.id,
        "change_id": delivery.change_id,
        "url": delivery.url,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "last_status_code": delivery.last_status_code,
        "last_error": delivery.last_error,
        "next_attempt_at": isoformat(delivery.next_attempt_at),
        "delivered_at": isoformat(delivery.delivered_at),
    }


def attempt_view(attempt: OutboundAttempt) -> dict[str, Any]:
    return {
        "attempt": attempt.attempt,
        "started_at": isoformat(attempt.started_at),
        "duration_ms": round(float(attempt.duration_ms), 1),
        "status_code": attempt.status_code,
        "error": attempt.error,
        "response_head": attempt.response_head,
    }


def delivery_detail(session: Session, delivery: OutboundDelivery) -> dict[str, Any]:
    """The delivery with every attempt, oldest first."""
    attempts = session.scalars(
        select(OutboundAttempt)
        .where(OutboundAttempt.delivery_id == delivery.id)
        .order_by(OutboundAttempt.id)
    ).all()
    return {**delivery_view(delivery), "attempts_made": [attempt_view(a) for a in attempts]}


def parse_since(value: str | None) -> datetime | None:
    """An ISO date or datetime (UTC when no zone is given), or `<n>m|h|d` ago."""
    if not value:
        return None
    units = {"m": 60, "h": 3600, "d": 86400}
    if value[-1] in units and value[:-1].isdigit():
        return utcnow() - timedelta(seconds=int(value[:-1]) * units[value[-1]])
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise FeedError(f"since must be an ISO date or time, or like 2h or 3d: {value!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=utcnow().tzinfo)


def _delivery_filters(
    *,
    status: str | None = None,
    url: str | None = None,
    since: str | None = None,
    change_ids: list[str] | None = None,
    ids: list[int] | None = None,
) -> list[Any]:
    where: list[Any] = []
    if status:
        if status not in set(DeliveryStatus):
            raise FeedError(f"status must be one of {', '.join(DeliveryStatus)}, not {status!r}")
        where.append(OutboundDelivery.status == status)
    if url:
        where.append(OutboundDelivery.url == url)
    moment = parse_since(since)
    if moment is not None:
        where.append(OutboundDelivery.created_at >= moment)
    if change_ids:
        where.append(OutboundDelivery.change_id.in_(change_ids))
    if ids:
        where.append(OutboundDelivery.id.in_(ids))
    return where


def list_deliveries(
    session: Session, *, limit: int = DEFAULT_LIMIT, **filters: Any
) -> list[OutboundDelivery]:
    """Deliveries matching the filters, newest first."""
    where = _delivery_filters(**filters)
    query = select(OutboundDelivery).where(*where).order_by(OutboundDelivery.id.desc())
    return list(session.scalars(query.limit(limit)).all())


@dataclass(frozen=True)
class Requeued:
    matched: int
    requeued: list[int]


def requeue_deliveries(session: Session, *, dry_run: bool = False, **filters: Any) -> Requeued:
    """Dead (or, when asked by status or id, pending) deliveries back to pending, due now.

    A delivered one is sent again only when named by id or change id: the receiver dedups on
    `webhook-id`, but re-sending everything delivered by accident is rarely meant.
    """
    if not any(filters.get(k) for k in ("ids", "change_ids", "since", "status")):
        raise FeedError("say which deliveries: ids, change_ids, since or status")
    where = _delivery_filters(**filters)
    if not (filters.get("ids") or filters.get("change_ids") or filters.get("status")):
        where.append(OutboundDelivery.status == DeliveryStatus.DEAD)
    rows = session.scalars(select(OutboundDelivery.id).where(*where)).all()
    if dry_run or not rows:
        return Requeued(len(rows), [])
    session.execute(
        update(OutboundDelivery)
        .where(OutboundDelivery.id.in_(rows))
        .values(
            status=DeliveryStatus.PENDING,
            attempts=0,
            next_attempt_at=utcnow(),
            lease_until=None,
            delivered_at=None,
        )
    )
    return Requeued(len(rows), list(rows))


def due_deliveries(session: Session, *, now: datetime, limit: int = 500) -> list[int]:
    """Pending deliveries due and not held by an attempt in flight: what beat re-drives."""
    rows = session.scalars(
        select(OutboundDelivery.id)
        .where(
            OutboundDelivery.status == DeliveryStatus.PENDING,
            OutboundDelivery.next_attempt_at <= now,
            or_(OutboundDelivery.lease_until.is_(None), OutboundDelivery.lease_until < now),
        )
        .order_by(OutboundDelivery.change_seq)
        .limit(limit)
    ).all()
    return list(rows)


def outbound_summary(session: Session) -> list[dict[str, Any]]:
    """Per URL: pending, the oldest pending's age in seconds, delivered, failed, dead."""
    now = utcnow()
    by_url: dict[str, dict[str, Any]] = {}
    counts = session.execute(
        select(
            OutboundDelivery.url,
            OutboundDelivery.status,
            func.count(),
            func.min(OutboundDelivery.created_at),
        ).group_by(OutboundDelivery.url, OutboundDelivery.status)
    ).all()
    for url, status, count, oldest in counts:
        entry = by_url.setdefault(
            url, {"url": url, "pending": 0, "delivered": 0, "dead": 0, "oldest_pending_age": 0.0}
        )
        entry[status] = int(count)
        if status == DeliveryStatus.PENDING and oldest is not None:
            if oldest.tzinfo is None:
                oldest = oldest.replace(tzinfo=now.tzinfo)
            entry["oldest_pending_age"] = max(0.0, (now - oldest).total_seconds())
    failed = session.execute(
        select(OutboundDelivery.url, func.count())
        .select_from(OutboundAttempt)
        .join(OutboundDelivery, OutboundDelivery.id == OutboundAttempt.delivery_id)
        .where(
            or_(
                OutboundAttempt.status_code.is_(None),
                OutboundAttempt.status_code < 200,
                OutboundAttempt.status_code >= 300,
            )
        )
        .group_by(OutboundDelivery.url)
    ).all()
    for url, count in failed:
        by_url.setdefault(
            url, {"url": url, "pending": 0, "delivered": 0, "dead": 0, "oldest_pending_age": 0.0}
        )["failed"] = int(count)
    for entry in by_url.values():
        entry.setdefault("failed", 0)
    return sorted(by_url.values(), key=lambda e: e["url"])
