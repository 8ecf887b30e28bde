"""The Celery tasks: claim a recorded event, apply it in one transaction, retry or bury it."""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import sqlalchemy.exc
from celery import Task
from celery.signals import worker_process_init
from kombu.exceptions import OperationalError as BrokerUnavailable
from redis.exceptions import RedisError
from sqlalchemy import Engine, Table, bindparam, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from shared.db import make_engine, make_sessionmaker, run_prebuilt, transaction, utcnow
from shared.envelope import EnvelopeError, read_envelope_head
from shared.logs import get_logger, log_step
from shared.models import EventStatus, Outcome, WebhookEvent
from shared.queue import PROCESS_EVENT, REDRIVE, enqueue
from shared.schemas import EventValidationError, parse_event
from shared.settings import Settings
from workers import app, settings
from workers.handlers import ROUTES, Delivery

log = get_logger("worker")

_engine: tuple[int, Engine, sessionmaker[Session]] | None = None


def sessions() -> sessionmaker[Session]:
    """This process's session factory; a forked pool child never reuses its parent's sockets.

    Claims and applications share its pool on purpose: a claim that meets a connection the
    server dropped fails without counting an attempt, and SQLAlchemy then replaces every
    connection of the pool, so the application after it does not meet a dead one. (A pool of
    their own for claims, to commit them without waiting for the WAL flush, lost that: with
    connections terminated every 0.3 s the fault suite saw an event die of them.)
    """
    global _engine
    if _engine is None or _engine[0] != os.getpid():
        engine = make_engine(settings.database_url, **engine_options(settings))
        _engine = (os.getpid(), engine, make_sessionmaker(engine))
    return _engine[2]


def engine_options(config: Settings) -> dict[str, Any]:
    """PostgreSQL ends a worker's transaction left idle (its process frozen) before the lease.

    A worker stopped mid-task (SIGSTOP, a paused VM, a hung process) keeps its transaction
    open and with it the locks it took: the lease runs out, but the re-drive skips locked
    rows and a new claim would wait on them, so the event stayed `processing` for as long
    as the process stayed frozen. With this timeout the server drops that session, the
    locks go, and the lease does its job; if the process wakes up, its connection is gone
    and the claim fencing (attempt number) makes it stand down.
    """
    # No ping per checkout: it was a round trip per transaction. A connection the server
    # dropped fails the claim, the first statement of a task, which retries without counting
    # an attempt; the pool then replaces its connections.
    options: dict[str, Any] = {"pool_pre_ping": False}
    if not config.database_url.startswith("postgresql"):
        return options
    timeout_ms = max(1000, config.lease_seconds * 1000 // 2)
    options["connect_args"] = {"options": f"-c idle_in_transaction_session_timeout={timeout_ms}"}
    return options


@worker_process_init.connect
def _fresh_engine_after_fork(**_: Any) -> None:
    global _engine
    _engine = None


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


def apply_event(session: Session, claim: Claim) -> tuple[EventStatus, Outcome | None]:
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
    finished = run_prebuilt(
        session.connection(),
        _FINISH,
        {
            "b_webhook_id": claim.webhook_id,
            "b_attempt": claim.attempt,
            "b_status": status,
            "b_outcome": expected,
            "b_now": utcnow(),
        },
    )
    if finished.rowcount == 0:
        raise LostClaim(claim.webhook_id)
    if handler is None or event is None or claim.event_at is None:
        return status, None  # ignored
    delivery = Delivery(claim.webhook_id, claim.webhook_ts, claim.event_at)
    outcome = handler(session, event, delivery)
    if outcome != expected:
        session.execute(_OUTCOME, {"b_webhook_id": claim.webhook_id, "b_outcome": outcome})
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


# Final at once: retrying cannot change the verdict on the same bytes.
PERMANENT_ERRORS: tuple[type[Exception], ...] = (EventValidationError, EnvelopeError)


def is_transient(exc: BaseException) -> bool:
    """Database or broker unavailable, deadlock, serialization failure: worth waiting for.

    Other errors (a handler meeting a row not there yet, a bug) are retried all the same,
    up to MAX_ATTEMPTS; the distinction goes in the log line for whoever reads it.
    """
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        return exc.connection_invalidated or isinstance(exc, sqlalchemy.exc.OperationalError)
    return isinstance(
        exc,
        RedisError | BrokerUnavailable | sqlalchemy.exc.TimeoutError | ConnectionError,
    )


def backoff_seconds(attempt: int, config: Settings) -> float:
    """Exponential with jitter (between half and all of the step), capped below the broker's
    visibility timeout: Redis would hand a countdown held longer to a second worker."""
    cap = min(config.retry_backoff_max_seconds, config.broker_visibility_timeout // 2)
    ceiling = min(cap, config.retry_backoff_base_seconds * 2 ** (attempt - 1))
    return random.uniform(ceiling / 2, ceiling)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]


@app.task(name=PROCESS_EVENT, bind=True, max_retries=None, acks_late=True)
def process_event(self: Task, webhook_id: str, after_attempt: int | None = None) -> str:
    factory = sessions()
    try:
        claim = claim_event(factory, webhook_id, settings.lease_seconds, after_attempt)
    except Exception as exc:
        # Nothing was claimed (database down?): ask again later, without counting an attempt.
        countdown = backoff_seconds(min(self.request.retries + 1, 16), settings)
        log.warning(
            "claim failed",
            extra={"step": "retry", "webhook_id": webhook_id, "error": describe(exc)},
        )
        raise self.retry(countdown=countdown, exc=exc) from None
    if claim is None:
        return "skipped"
    fields: dict[str, Any] = {
        "webhook_id": webhook_id,
        "type": claim.type,
        "attempt": claim.attempt,
    }
    if claim.attempt > settings.max_attempts:
        # Earlier attempts ended without a written verdict (worker killed, database away when
        # burying): this one stops the loop, and does not count itself as an attempt.
        error = f"gave up after {settings.max_attempts} attempts"
        error += f"; last error: {claim.last_error}" if claim.last_error else " without a result"
        return bury(self, factory, claim, error, fields, attempts=claim.attempt - 1)
    log_step(log, "processing", **fields)
    try:
        with transaction(factory) as session:
            status, outcome = apply_event(session, claim)
    except LostClaim:
        return "skipped"
    except PERMANENT_ERRORS as exc:
        return bury(self, factory, claim, str(exc), fields)
    except Exception as exc:
        error = describe(exc)
        if claim.attempt >= settings.max_attempts:
            return bury(self, factory, claim, error, fields)
        countdown = backoff_seconds(claim.attempt, settings)
        try:
            held = settle_failure(
                factory,
                claim,
                status=EventStatus.RETRYING,
                error=error,
                next_attempt_at=utcnow() + timedelta(seconds=countdown),
            )
        except Exception:
            # Not written: the retry message's after_attempt still lets it claim.
            held = True
        if not held:
            return "skipped"  # another attempt took the event over meanwhile
        log_step(
            log,
            "retry",
            level=logging.WARNING,
            error=error,
            transient=is_transient(exc),
            countdown=round(countdown, 2),
            **fields,
        )
        # Sending the retry may fail too (Redis away): Celery then drops this message, and
        # the event, `retrying` in the database, is re-driven by beat.
        raise self.retry(
            args=[webhook_id],
            kwargs={"after_attempt": claim.attempt},
            countdown=countdown,
            exc=exc,
        ) from None
    log_step(log, str(status), outcome=outcome, **fields)
    return str(status)


def bury(
    task: Task,
    factory: sessionmaker[Session],
    claim: Claim,
    error: str,
    fields: dict[str, Any],
    *,
    attempts: int | None = None,
) -> str:
    """Mark the event dead with its error; if that cannot be written, come back to write it."""
    try:
        held = settle_failure(
            factory, claim, status=EventStatus.DEAD, error=error, attempts=attempts
        )
    except Exception as exc:
        # The next claim of this attempt is past MAX_ATTEMPTS and buries it, error kept.
        log.warning(
            "could not record dead event",
            extra={"step": "retry", "error": describe(exc), **fields},
        )
        raise task.retry(
            args=[claim.webhook_id],
            kwargs={"after_attempt": claim.attempt},
            countdown=backoff_seconds(1, settings),
            exc=exc,
        ) from None
    if not held:
        return "skipped"  # another attempt took the event over meanwhile
    log_step(log, "dead", level=logging.WARNING, error=error, **fields)
    return "dead"


@app.task(name=REDRIVE, ignore_result=True)
def redrive() -> int:
    """Queue again what is recorded but not moving: pending, retrying past due, lease expired."""
    now = utcnow()
    stale = now - timedelta(seconds=settings.redrive_after_seconds)
    with transaction(sessions()) as session:
        rows = session.execute(
            select(WebhookEvent.webhook_id, WebhookEvent.type)
            .where(
                or_(
                    (WebhookEvent.status == EventStatus.PENDING)
                    & or_(WebhookEvent.enqueued_at.is_(None), WebhookEvent.enqueued_at < stale),
                    (WebhookEvent.status == EventStatus.RETRYING)
                    & (WebhookEvent.next_attempt_at < stale),
                    (WebhookEvent.status == EventStatus.PROCESSING)
                    & (WebhookEvent.lease_expires_at < now),
                )
            )
            .limit(5000)
            .with_for_update(skip_locked=True)
        ).all()
        for row in rows:
            enqueue(app, row.webhook_id, row.type)
        if rows:
            session.execute(
                update(WebhookEvent)
                .where(
                    WebhookEvent.webhook_id.in_([r.webhook_id for r in rows]),
                    WebhookEvent.status == EventStatus.PENDING,
                )
                .values(enqueued_at=now)
            )
            session.execute(
                update(WebhookEvent)
                .where(
                    WebhookEvent.webhook_id.in_([r.webhook_id for r in rows]),
                    WebhookEvent.status == EventStatus.RETRYING,
                )
                .values(next_attempt_at=now + timedelta(seconds=settings.redrive_after_seconds))
            )
    if rows:
        log.info("re-drove events", extra={"step": "redrive", "count": len(rows)})
    return len(rows)


app.conf.beat_schedule = {
    "redrive-stuck-events": {"task": REDRIVE, "schedule": settings.redrive_interval_seconds},
}
