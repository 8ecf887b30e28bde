"""Claiming recorded events, applying them under a fenced finish, and settling a failure.

An attempt claims the event (status `processing`, the attempt counted, a lease), then in one
transaction marks it final, fenced on its attempt number, and runs the routed handler. Only
the attempt that holds the claim can finish the event or record its failure. A drain claims
up to N ready events of a queue in one statement and applies them in one transaction, each
in a savepoint of its own (`claim_batch`, `apply_batch`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, cast

from sqlalchemy import (
    ColumnElement,
    Engine,
    Executable,
    String,
    Table,
    Update,
    and_,
    bindparam,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session, sessionmaker

from shared.bodies import LATE, keep_in_row, partitioned, reading_body
from shared.catalog import EVENT_QUEUES, FAMILY_OF, OTHER_QUEUE
from shared.changes import (
    RECORDED,
    defer_changes,
    deferred_count,
    fan_out,
    forget_deferred_since,
    write_deferred,
)
from shared.db import transaction, utcnow
from shared.envelope import read_envelope_head
from shared.lifecycle import customer_in_body, erase_on_apply
from shared.models import CustomerErasure, EventStatus, Outcome, Payment, WebhookEvent
from workers.handlers import ROUTES, Delivery
from workers.schemas import parse_event
from workers.statements import execute, run_prebuilt


@dataclass(frozen=True)
class Claim:
    webhook_id: str
    type: str | None
    body: bytes
    attempt: int
    webhook_ts: int
    event_at: datetime | None
    # The previous attempt's error, kept when an attempt gives up without one of its own.
    last_error: str | None = None
    # Where its body is stored (shared/bodies.py); None for a claim made up by a test.
    received_at: datetime | None = None


class LostClaim(Exception):
    """Another worker claimed the event after this one's lease ran out; this attempt stands down."""


EVENTS = cast(Table, WebhookEvent.__table__)
ERASURES = cast(Table, CustomerErasure.__table__)
PAYMENTS = cast(Table, Payment.__table__)
# Where apply_event leaves the ids of the outbound deliveries it created, for the task.
DELIVERIES_MADE = "dodo_webhooks.deliveries"

# Statements built once (building them per task cost more CPU than running them), on the
# table rather than the mapped class: plain Core, no ORM bookkeeping on the hot path.
# What a claim, of one event or of a batch, writes and reads back.
CLAIMED: Final[dict[str, Any]] = {
    "status": EventStatus.PROCESSING,
    "attempts": EVENTS.c.attempts + 1,
    "lease_expires_at": bindparam("b_lease_until"),
}
CLAIM_RETURNS: Final = (
    EVENTS.c.type,
    EVENTS.c.body,
    EVENTS.c.attempts,
    EVENTS.c.webhook_ts,
    EVENTS.c.event_at,
    EVENTS.c.last_error,
    EVENTS.c.received_at,
)
_CLAIM = (
    update(EVENTS)
    .where(
        EVENTS.c.webhook_id == bindparam("b_webhook_id"),
        or_(
            # Two comparisons, not IN (...): SQLAlchemy expands a list parameter on every run.
            EVENTS.c.status == EventStatus.PENDING,
            EVENTS.c.status == EventStatus.RETRYING,
            (EVENTS.c.status == EventStatus.PROCESSING)
            & (EVENTS.c.lease_expires_at < bindparam("b_now")),
            # The retry of an attempt whose failure could not be written (database down);
            # NULL when the message is not such a retry, which matches nothing.
            (EVENTS.c.status == EventStatus.PROCESSING)
            & (EVENTS.c.attempts == bindparam("b_after_attempt")),
        ),
    )
    .values(**CLAIMED)
    .returning(EVENTS.c.webhook_id, *CLAIM_RETURNS)
)
# The customer of this event if it was erased (its own, or its payment's): the worker then
# erases what it applies, in this transaction (shared/lifecycle.py). An erasure recorded
# just after this check waits on this event's row lock, held from here to the commit.
_ERASED = (
    select(ERASURES.c.customer_id)
    .where(
        or_(
            ERASURES.c.customer_id == bindparam("b_customer_id", type_=String()),
            ERASURES.c.customer_id
            == select(PAYMENTS.c.customer_id)
            .where(PAYMENTS.c.payment_id == bindparam("b_payment_id", type_=String()))
            .scalar_subquery(),
        )
    )
    .limit(1)
    .scalar_subquery()
)
# Fenced: only the attempt that holds the claim finishes the event (apply_event).
_FINISH = (
    update(EVENTS)
    .where(
        EVENTS.c.webhook_id == bindparam("b_webhook_id"),
        EVENTS.c.status == EventStatus.PROCESSING,
        EVENTS.c.attempts == bindparam("b_attempt"),
    )
    .values(
        status=bindparam("b_status"),
        outcome=bindparam("b_outcome"),
        last_error=None,
        lease_expires_at=None,
        next_attempt_at=None,
        processed_at=bindparam("b_now"),
    )
    .returning(_ERASED.label("erased_customer"))
)
_OUTCOME = (
    update(EVENTS)
    .where(EVENTS.c.webhook_id == bindparam("b_webhook_id"))
    .values(outcome=bindparam("b_outcome"))
)


def claim_event(
    factory: sessionmaker[Session], webhook_id: str, lease_seconds: int, after_attempt: int | None
) -> Claim | None:
    """Mark the event processing and count the attempt, committed at once (autocommit).

    Returns None when there is nothing to do: already final, or claimed by a live worker.
    """
    now = utcnow()
    params = {
        "b_webhook_id": webhook_id,
        "b_now": now,
        "b_after_attempt": after_attempt,
        "b_lease_until": now + timedelta(seconds=lease_seconds),
    }
    claimed = run_claim(factory, _CLAIM, params)
    return claimed[0] if claimed else None


def run_claim(
    factory: sessionmaker[Session], statement: Update, params: dict[str, Any]
) -> list[Claim]:
    """Run a claim (an UPDATE returning the webhook id and CLAIM_RETURNS) as the whole
    transaction, committed at once: one round trip, no BEGIN/COMMIT; its rows as claims,
    with the bodies their rows do not hold read from their days' partitions by the same
    statement (`shared.bodies.reading_body`)."""
    engine: Engine = factory.kw["bind"]
    claim: Executable = reading_body(statement) if partitioned(engine) else statement
    with engine.connect() as conn:
        autocommit = conn.execution_options(isolation_level="AUTOCOMMIT")
        rows = run_prebuilt(autocommit, claim, params).all()
    return [
        Claim(
            row.webhook_id,
            row.type,
            row.body or b"",
            row.attempts,
            row.webhook_ts,
            row.event_at.astimezone(UTC) if row.event_at is not None else None,
            row.last_error,
            row.received_at,
        )
        for row in rows
    ]


def apply_event(
    session: Session, claim: Claim, outbound_urls: tuple[str, ...] = ()
) -> tuple[EventStatus, Outcome | None]:
    """Mark the event final and run the routed handler, inside the caller's transaction.

    The final UPDATE comes first: fenced on this attempt, it is also what holds the event's
    row, locked until the transaction ends, while the handler runs. A claim of a later
    attempt (the lease ran out: a handler waiting on a lock, a slow database) waits on that
    lock instead of starting a second application beside this one, and the re-drive skips
    the locked row; when this transaction commits, that claim finds the event final. If the
    UPDATE matches nothing, another attempt took the event over: LostClaim, before any
    effect. The order is invisible to everyone else: the status and the handler's effects
    commit together or not at all.
    """
    if claim.type is None:
        # Dead on arrival (not an event envelope) and retried by an operator: same verdict.
        read_envelope_head(claim.body)
    handler = ROUTES.get(claim.type or "")
    event = parse_event(claim.type, claim.body) if handler and claim.type else None
    applies = handler is not None and event is not None and claim.event_at is not None
    status = EventStatus.PROCESSED if applies else EventStatus.IGNORED
    # The usual outcome, written now; corrected below when the handler says otherwise.
    expected = Outcome.APPLIED if applies else None
    data = getattr(event, "data", None)
    customer_id = getattr(data, "customer_id", None) if event else customer_in_body(claim.body)
    finished = execute(
        session,
        _FINISH,
        {
            "b_webhook_id": claim.webhook_id,
            "b_attempt": claim.attempt,
            "b_status": status,
            "b_outcome": expected,
            "b_now": utcnow(),
            "b_customer_id": customer_id,
            "b_payment_id": getattr(data, "payment_id", None),
        },
    ).first()
    if finished is None:
        raise LostClaim(claim.webhook_id)
    if claim.received_at is not None and claim.received_at < utcnow() - LATE:
        # Finished late: its day's bodies may be dropped before RETENTION_DAYS have passed
        # since now, so the row keeps its own copy (shared/bodies.py).
        keep_in_row(session, claim.webhook_id, claim.received_at)
    erased_customer = finished.erased_customer
    if handler is None or event is None or claim.event_at is None:
        if erased_customer is not None:
            erase_on_apply(session, claim.webhook_id, erased_customer)
        return status, None  # ignored
    delivery = Delivery(claim.webhook_id, claim.webhook_ts, claim.event_at)
    outcome = handler(session, event, delivery)
    if outcome != expected:
        execute(session, _OUTCOME, {"b_webhook_id": claim.webhook_id, "b_outcome": outcome})
    if erased_customer is not None:
        # An event that arrived after its customer's erasure, or applied meanwhile.
        erase_on_apply(session, claim.webhook_id, erased_customer)
    # The change the handler recorded, one delivery per outbound URL: in this transaction,
    # so a change is never without its deliveries. A batch adds each event's to the list.
    session.info.setdefault(DELIVERIES_MADE, []).extend(fan_out(session, outbound_urls))
    return status, outcome


def settle_failure(
    factory: sessionmaker[Session],
    claim: Claim,
    *,
    status: EventStatus,
    error: str,
    next_attempt_at: datetime | None = None,
    attempts: int | None = None,
) -> bool:
    """Record a failed attempt as retrying or dead, if this attempt still holds the event."""
    values: dict[str, Any] = {} if attempts is None else {"attempts": attempts}
    with transaction(factory) as session:
        result = session.execute(
            update(WebhookEvent)
            .where(
                WebhookEvent.webhook_id == claim.webhook_id,
                WebhookEvent.status == EventStatus.PROCESSING,
                WebhookEvent.attempts == claim.attempt,
            )
            .values(
                status=status,
                last_error=error[:2000],
                lease_expires_at=None,
                next_attempt_at=next_attempt_at,
                processed_at=utcnow() if status == EventStatus.DEAD else None,
                **values,
            )
        )
    return bool(result.rowcount)  # type: ignore[attr-defined]


# --- batches: the drain ---------------------------------------------------------------


def _of_queue(queue: str) -> ColumnElement[bool]:
    # Comparisons with constants, not IN (...): run_prebuilt sends the SQL text as compiled.
    if queue == OTHER_QUEUE:
        return or_(EVENTS.c.type.is_(None), and_(*(EVENTS.c.type != t for t in FAMILY_OF)))
    return or_(*(EVENTS.c.type == t for t, family in FAMILY_OF.items() if family == queue))


def _batch_claim(queue: str) -> Update:
    # Oldest received first, through the (status, received_at) index: a claim costs the same
    # with ten events waiting or a million, where an ORDER BY on the occurrence would sort
    # the whole backlog each time. The batch is applied in occurrence order (`claim_batch`).
    ready = (
        select(EVENTS.c.webhook_id)
        .where(EVENTS.c.status == EventStatus.PENDING, _of_queue(queue))
        .order_by(EVENTS.c.received_at)
        .limit(bindparam("b_limit"))
        .with_for_update(skip_locked=True)
    )
    return (
        update(EVENTS)
        .where(EVENTS.c.webhook_id.in_(ready.scalar_subquery()))
        .values(**CLAIMED)
        .returning(EVENTS.c.webhook_id, *CLAIM_RETURNS)
    )


_BATCH_CLAIMS: dict[str, Update] = {queue: _batch_claim(queue) for queue in EVENT_QUEUES}


def pending_left(factory: sessionmaker[Session], queue: str) -> bool:
    """Whether `queue` still has a pending event, locked or not: one that a claim skipped
    because another transaction held its row (an erasure, the purge)."""
    query = select(EVENTS.c.webhook_id).where(
        EVENTS.c.status == EventStatus.PENDING, _of_queue(queue)
    )
    with factory() as session:
        return session.execute(query.limit(1)).first() is not None


_SETTLE = (
    update(EVENTS)
    .where(
        EVENTS.c.webhook_id == bindparam("b_webhook_id"),
        EVENTS.c.status == EventStatus.PROCESSING,
        EVENTS.c.attempts == bindparam("b_attempt"),
    )
    .values(
        status=bindparam("b_status"),
        attempts=bindparam("b_attempts"),
        last_error=bindparam("b_error"),
        lease_expires_at=None,
        next_attempt_at=bindparam("b_next_attempt_at"),
        processed_at=bindparam("b_processed_at"),
    )
)
_NEVER = datetime.min.replace(tzinfo=UTC)


def claim_batch(
    factory: sessionmaker[Session], queue: str, limit: int, lease_seconds: int
) -> list[Claim]:
    """Claim up to `limit` pending events of `queue` in one statement, committed at once.

    Each claimed event counts one attempt, as `claim_event` does; events another worker is
    claiming are skipped (`SKIP LOCKED`), not waited for. Retrying events are not taken:
    their own `process_event` message, with its countdown, claims them. The claims come back
    grouped by the record they write (`lock_key`), each record's events in occurrence order
    (envelope timestamp, then `webhook-timestamp`, then webhook id).
    """
    now = utcnow()
    params = {"b_limit": limit, "b_lease_until": now + timedelta(seconds=lease_seconds)}
    claims = run_claim(factory, _BATCH_CLAIMS[queue], params)
    claims.sort(
        key=lambda c: (lock_key(queue, c), c.event_at or _NEVER, c.webhook_ts, c.webhook_id)
    )
    return claims


# The `data` fields that name the row an event of the family locks and writes.
_LOCKED_BY: Final[dict[str, tuple[str, ...]]] = {
    "payments": ("payment_id",),
    "refunds": ("refund_id",),
    "disputes": ("dispute_id",),
    "subscriptions": ("subscription_id",),
    "license_keys": ("id",),
    "credits": ("customer_id", "credit_entitlement_id"),
}


def lock_key(queue: str, claim: Claim) -> tuple[str, ...]:
    """The record an event's handler locks, as a sortable key.

    Two drains applying batches of one family at once lock the records of their events in
    the order of their batches; sorted by this key, every batch takes its locks in one
    global order, so two batches never wait on each other in a circle (a deadlock costs
    PostgreSQL's `deadlock_timeout`, a second, and a rerun). A body that does not parse
    sorts first: it fails alone in its attempt, before taking any lock.
    """
    fields = _LOCKED_BY.get(queue)
    if not fields:
        return ()
    try:
        data = json.loads(claim.body).get("data")
    except (ValueError, AttributeError):
        return ()
    if not isinstance(data, dict):
        return ()
    return tuple(str(data.get(name, "")) for name in fields)


@dataclass(frozen=True)
class Applied:
    """An event of a batch that its attempt finished: processed or ignored."""

    claim: Claim
    status: EventStatus
    outcome: Outcome | None


@dataclass(frozen=True)
class Failed:
    """An event of a batch whose handler raised; its savepoint was rolled back."""

    claim: Claim
    error: BaseException


@dataclass(frozen=True)
class Lost:
    """An event of a batch that another attempt took over before this one finished it."""

    claim: Claim


Result = Applied | Failed | Lost


class BatchFailed(Exception):
    """An event of a batch applied without savepoints raised: its transaction must be rolled
    back, and the batch applied again with a savepoint per event (`apply_batch`)."""


def apply_batch(
    session: Session,
    claims: list[Claim],
    *,
    isolate: bool = True,
    outbound_urls: tuple[str, ...] = (),
) -> list[Result]:
    """Apply each claim in the caller's transaction, in the order given.

    With `isolate`, each event runs in a savepoint of its own: a handler that raises has its
    savepoint rolled back, so its event's writes go and its batch-mates' stay; the caller
    settles it (`settle_in`) in the same transaction. Without, there are no savepoints (two
    round trips fewer per event) and the first event that raises raises BatchFailed: the
    caller rolls the whole transaction back and applies the batch again isolated, in the same
    attempt, so a poison event costs its batch-mates time, never an attempt or their effects.
    Only a failure the transaction itself cannot survive (the connection lost) propagates
    otherwise: then nothing of the batch is committed, and every claim keeps its `processing`
    status and its counted attempt for the caller to settle.
    """
    results: list[Result] = []
    # The batch's changes are written at its end, under the feed lock held to the commit:
    # written event by event, the first would hold that lock over all the others' work.
    defer_changes(session)
    for claim in claims:
        if not isolate:
            try:
                status, outcome = apply_event(session, claim, outbound_urls)
            except LostClaim:
                results.append(Lost(claim))  # nothing was written for it: no rollback needed
                continue
            except Exception as exc:
                raise BatchFailed(claim.webhook_id) from exc
            results.append(Applied(claim, status, outcome))
            continue
        savepoint = session.begin_nested()
        made = len(session.info.get(DELIVERIES_MADE, []))
        kept = deferred_count(session)
        try:
            status, outcome = apply_event(session, claim, outbound_urls)
        except LostClaim:
            savepoint.rollback()
            _forget_since(session, made, kept)
            results.append(Lost(claim))
        except Exception as exc:
            # Raises in turn when the connection is gone: the whole batch failed.
            savepoint.rollback()
            _forget_since(session, made, kept)
            results.append(Failed(claim, exc))
        else:
            savepoint.commit()
            results.append(Applied(claim, status, outcome))
    write_deferred(session, run=execute)
    session.info.setdefault(DELIVERIES_MADE, []).extend(fan_out(session, outbound_urls))
    return results


def _forget_since(session: Session, made: int, kept: int) -> None:
    """After a savepoint's rollback: the change its handler recorded and the deliveries made
    for it are gone with it, so neither may be written, fanned out or signalled."""
    forget_deferred_since(session, kept)
    session.info.pop(RECORDED, None)
    del session.info.get(DELIVERIES_MADE, [])[made:]


def settle_in(
    session: Session,
    claim: Claim,
    *,
    status: EventStatus,
    error: str,
    next_attempt_at: datetime | None = None,
    attempts: int | None = None,
) -> bool:
    """`settle_failure` inside the caller's transaction (a drain's batch)."""
    result = execute(
        session,
        _SETTLE,
        {
            "b_webhook_id": claim.webhook_id,
            "b_attempt": claim.attempt,
            "b_status": status,
            "b_attempts": claim.attempt if attempts is None else attempts,
            "b_error": error[:2000],
            "b_next_attempt_at": next_attempt_at,
            "b_processed_at": utcnow() if status == EventStatus.DEAD else None,
        },
    )
    return bool(result.rowcount)
