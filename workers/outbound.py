"""Pushing changes to each `OUTBOUND_WEBHOOK_URL`: claim a delivery, POST it signed, record it.

Per URL and entity a delivery is claimed only when no earlier change of that entity is
still pending for that URL, so the receiver sees an entity's changes in feed order. The
claim counts the attempt and takes a lease (committed at once), the POST runs outside any
transaction, then the attempt and the verdict are written, fenced on the attempt number. A
worker killed mid-POST leaves the lease to run out; beat re-drives the delivery, and the
receiver gets it again with the same `webhook-id`.

The task only hands the delivery to a few sender threads of the worker process
(workers/tasks.py), so a receiver that hangs holds threads, not the pool processes that
apply events. A URL that is failing (a pending delivery of it carries an error) gets one
POST in flight at a time.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import httpx
from sqlalchemy import (
    ColumnElement,
    Engine,
    Table,
    and_,
    exists,
    insert,
    literal_column,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, aliased, sessionmaker
from standardwebhooks.webhooks import Webhook

from shared.changes import outbound_body
from shared.db import transaction, utcnow
from shared.models import Change, DeliveryStatus, OutboundAttempt, OutboundDelivery
from shared.settings import Settings

DELIVERIES = cast(Table, OutboundDelivery.__table__)
# The answer's first bytes kept with the attempt: enough to read an error page's reason.
RESPONSE_HEAD_BYTES = 1024
# Added to the POST timeout for the lease: the attempt's own bookkeeping.
LEASE_SLACK_SECONDS = 5

_earlier = aliased(OutboundDelivery)
_inflight = aliased(OutboundDelivery)
_failing = aliased(OutboundDelivery)
D = OutboundDelivery
PENDING: ColumnElement[str] = literal_column("'pending'")


def _claimable(now: Any) -> list[Any]:
    """Due, not held, nothing earlier of its entity pending, and the URL's probe rule."""
    return [
        D.status == DeliveryStatus.PENDING,
        D.next_attempt_at <= now,
        (D.lease_until.is_(None)) | (D.lease_until < now),
        ~exists().where(
            _earlier.url == D.url,
            _earlier.kind == D.kind,
            _earlier.entity_id == D.entity_id,
            _earlier.change_seq < D.change_seq,
            _earlier.status == DeliveryStatus.PENDING,
        ),
        ~and_(
            # Literal, as the partial indexes' predicates are, so the planner can use them.
            exists().where(
                _failing.url == D.url,
                _failing.status == PENDING,
                _failing.last_error.is_not(None),
            ),
            exists().where(
                _inflight.url == D.url,
                _inflight.id != D.id,
                _inflight.status == PENDING,
                _inflight.lease_until.is_not(None),
                _inflight.lease_until > now,
            ),
        ),
    ]


def _no_flush_wait(conn: Connection) -> None:
    """Commit without waiting for the WAL flush: a crash may forget a claim or a verdict,
    and the delivery is then sent again with the same `webhook-id`, which is the promise
    (at least once) anyway; what it saves is a disk flush per claim and per verdict."""
    if conn.dialect.name == "postgresql":
        conn.execute(_ASYNC_COMMIT)


_ASYNC_COMMIT = text("SET LOCAL synchronous_commit = off")


@dataclass(frozen=True)
class Claimed:
    id: int
    attempt: int
    url: str
    kind: str
    entity_id: str
    change_seq: int


def claim_delivery(engine: Engine, delivery_id: int, lease_seconds: float) -> Claimed | None:
    """Count the attempt and take the lease, committed at once; None when not claimable now."""
    now = utcnow()
    statement = (
        update(D)
        .where(D.id == delivery_id, *_claimable(now))
        .values(attempts=D.attempts + 1, lease_until=now + timedelta(seconds=lease_seconds))
        .returning(D.attempts, D.url, D.kind, D.entity_id, D.change_seq)
    )
    with engine.begin() as conn:
        _no_flush_wait(conn)
        row = conn.execute(statement).first()
    if row is None:
        return None
    return Claimed(delivery_id, row.attempts, row.url, row.kind, row.entity_id, row.change_seq)


@dataclass(frozen=True)
class Answer:
    status_code: int | None
    duration_ms: float
    error: str | None
    head: str | None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def post_change(
    client: httpx.Client, url: str, secret: str, change: Change, timeout: float
) -> Answer:
    """One signed POST; redirects are not followed (a 3xx is a failure), the answer's first
    bytes kept, never its whole body."""
    body = outbound_body(change)
    moment = datetime.now(UTC)
    headers = {
        "content-type": "application/json",
        "webhook-id": change.id,
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": Webhook(secret).sign(change.id, moment, body),
        "user-agent": "dodo-webhooks",
    }
    started = time.perf_counter()
    try:
        with client.stream(
            "POST", url, content=body.encode(), headers=headers, timeout=timeout
        ) as response:
            head = b""
            for chunk in response.iter_bytes():
                head += chunk
                if len(head) >= RESPONSE_HEAD_BYTES:
                    break
            status = response.status_code
    except httpx.HTTPError as exc:
        elapsed = (time.perf_counter() - started) * 1000
        return Answer(None, elapsed, f"{type(exc).__name__}: {exc}"[:500], None)
    elapsed = (time.perf_counter() - started) * 1000
    text = head[:RESPONSE_HEAD_BYTES].decode("utf-8", errors="replace")
    error = None if 200 <= status < 300 else f"HTTP {status}"
    return Answer(status, elapsed, error, text)


def backoff_seconds(attempt: int, config: Settings) -> float:
    """Exponential with jitter (half to all of the step), capped below the broker's
    visibility timeout, as the events' retries are."""
    cap = min(config.outbound_backoff_max_seconds, config.broker_visibility_timeout // 2)
    ceiling = min(cap, config.outbound_backoff_base_seconds * 2 ** (attempt - 1))
    return random.uniform(ceiling / 2, ceiling)


@dataclass(frozen=True)
class Verdict:
    status: DeliveryStatus
    countdown: float | None = None


def settle(
    factory: sessionmaker[Session],
    claimed: Claimed,
    answer: Answer,
    started_at: datetime,
    config: Settings,
) -> Verdict | None:
    """Record the attempt and the delivery's new state; None if another attempt took over."""
    now = utcnow()
    if answer.ok:
        verdict = Verdict(DeliveryStatus.DELIVERED)
        values: dict[str, Any] = {"status": verdict.status, "delivered_at": now}
    elif claimed.attempt >= config.outbound_max_attempts:
        verdict = Verdict(DeliveryStatus.DEAD)
        values = {"status": verdict.status}
    else:
        countdown = backoff_seconds(claimed.attempt, config)
        verdict = Verdict(DeliveryStatus.PENDING, countdown)
        values = {"next_attempt_at": now + timedelta(seconds=countdown)}
    with transaction(factory) as session:
        _no_flush_wait(session.connection())
        result = session.execute(
            update(D)
            .where(
                D.id == claimed.id,
                D.attempts == claimed.attempt,
                D.status == DeliveryStatus.PENDING,
            )
            .values(
                lease_until=None,
                last_status_code=answer.status_code,
                last_error=answer.error,
                **values,
            )
        )
        session.execute(
            insert(OutboundAttempt).values(
                delivery_id=claimed.id,
                attempt=claimed.attempt,
                started_at=started_at,
                duration_ms=answer.duration_ms,
                status_code=answer.status_code,
                error=answer.error,
                response_head=answer.head,
            )
        )
    return verdict if result.rowcount else None  # type: ignore[attr-defined]


def give_up(factory: sessionmaker[Session], claimed: Claimed, error: str) -> None:
    """Dead without a POST: the attempts ran out without a verdict (workers killed mid-POST)."""
    with transaction(factory) as session:
        session.execute(
            update(D)
            .where(D.id == claimed.id, D.attempts == claimed.attempt)
            .values(
                status=DeliveryStatus.DEAD,
                attempts=claimed.attempt - 1,
                lease_until=None,
                last_error=error,
            )
        )


def next_in_line(factory: sessionmaker[Session], claimed: Claimed) -> int | None:
    """The entity's next pending delivery to this URL, which this one's verdict unblocked."""
    with factory() as session:
        return session.scalar(
            select(D.id)
            .where(
                D.url == claimed.url,
                D.kind == claimed.kind,
                D.entity_id == claimed.entity_id,
                D.status == DeliveryStatus.PENDING,
                D.change_seq > claimed.change_seq,
            )
            .order_by(D.change_seq)
            .limit(1)
        )


def due(
    factory: sessionmaker[Session],
    *,
    older_than: datetime,
    url: str | None = None,
    limit: int = 1000,
) -> list[int]:
    """Pending deliveries claimable now and due since `older_than`: what beat re-drives, and
    what a failing URL held back once it answers again."""
    now = utcnow()
    where = [*_claimable(now), D.next_attempt_at <= older_than]
    if url is not None:
        where.append(D.url == url)
    with factory() as session:
        rows = session.scalars(select(D.id).where(*where).order_by(D.change_seq).limit(limit)).all()
    return list(rows)


def load_change(factory: sessionmaker[Session], seq: int) -> Change | None:
    with factory() as session:
        return session.get(Change, seq)
