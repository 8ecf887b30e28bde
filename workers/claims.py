"""Claiming a recorded event, applying it under a fenced finish, and settling a failure.

An attempt claims the event (status `processing`, the attempt counted, a lease), then in one
transaction marks it final, fenced on its attempt number, and runs the routed handler. Only
the attempt that holds the claim can finish the event or record its failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Engine, String, Table, bindparam, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from shared.changes import fan_out
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


class LostClaim(Exception):
    """Another worker claimed the event after this one's lease ran out; this attempt stands down."""


EVENTS = cast(Table, WebhookEvent.__table__)
ERASURES = cast(Table, CustomerErasure.__table__)
PAYMENTS = cast(Table, Payment.__table__)
# Where apply_event leaves the ids of the outbound deliveries it created, for the task.
DELIVERIES_MADE = "dodo_webhooks.deliveries"

# Statements built once (building them per task cost more CPU than running them), on the
# table rather than the mapped class: plain Core, no ORM bookkeeping on the hot path.
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
    .values(
        status=EventStatus.PROCESSING,
        attempts=EVENTS.c.attempts + 1,
        lease_expires_at=bindparam("b_lease_until"),
    )
    .returning(
        EVENTS.c.type,
        EVENTS.c.body,
        EVENTS.c.attempts,
        EVENTS.c.webhook_ts,
        EVENTS.c.event_at,
        EVENTS.c.last_error,
    )
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
    engine: Engine = factory.kw["bind"]
    with engine.connect() as conn:
        # One statement is the whole transaction: one round trip, no BEGIN/COMMIT.
        autocommit = conn.execution_options(isolation_level="AUTOCOMMIT")
        row = run_prebuilt(autocommit, _CLAIM, params).first()
    if row is None:
        return None
    event_at = row.event_at.astimezone(UTC) if row.event_at is not None else None
    return Claim(
        webhook_id,
        row.type,
        row.body,
        row.attempts,
        row.webhook_ts,
        event_at,
        row.last_error,
    )


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
    # so a change is never without its deliveries.
    session.info[DELIVERIES_MADE] = fan_out(session, outbound_urls)
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
