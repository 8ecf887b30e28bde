"""The Celery edge: the drain that applies a queue's ready events in batches, the task that
processes one event (retries, re-drives, replays), and beat's re-drive."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import redis
from celery import Task
from celery.signals import worker_process_init
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from shared.catalog import queue_for
from shared.db import transaction, utcnow
from shared.logs import get_logger, log_step
from shared.models import EventStatus, WebhookEvent
from shared.queue import DRAIN, PROCESS_EVENT, REDRIVE, enqueue, send_drain, wake_key
from workers.app import app, settings
from workers.claims import (
    Applied,
    BatchFailed,
    Claim,
    Failed,
    LostClaim,
    Result,
    apply_batch,
    apply_event,
    claim_batch,
    claim_event,
    settle_failure,
    settle_in,
)
from workers.engine import ProcessDatabase
from workers.retry import Failure, backoff_seconds, classify, describe

log = get_logger("worker")

database = ProcessDatabase(settings)


@worker_process_init.connect
def _fresh_engine_after_fork(**_: Any) -> None:
    database.forget()


@app.task(name=PROCESS_EVENT, bind=True, max_retries=None, acks_late=True)
def process_event(self: Task, webhook_id: str, after_attempt: int | None = None) -> str:
    factory = database.sessions()
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
    except Exception as exc:
        failure = classify(exc)
        if failure is Failure.PERMANENT:
            return bury(self, factory, claim, str(exc), fields)
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
            failure=str(failure),
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
    """Queue again what is recorded but not moving: pending, retrying past due, and claims
    whose worker is gone.

    A live attempt holds its event's row locked from the first statement of its transaction
    until it commits, so a `processing` row that `SKIP LOCKED` can take and whose claim is
    older than `RECLAIM_AFTER_SECONDS` belongs to a worker that died (SIGKILL, OOM): its lease
    is cut short so that the next claim takes it, without waiting `LEASE_SECONDS`. A worker
    merely paused between its claim and its transaction loses the claim this way, and its
    finish is then fenced off by the attempt number: never two applications.
    """
    now = utcnow()
    stale = now - timedelta(seconds=settings.redrive_after_seconds)
    # Claimed before `now - RECLAIM_AFTER_SECONDS`: its lease runs out after this.
    abandoned = now + timedelta(seconds=settings.lease_seconds - settings.reclaim_after_seconds)
    with transaction(database.sessions()) as session:
        rows = session.execute(
            select(WebhookEvent.webhook_id, WebhookEvent.type, WebhookEvent.status)
            .where(
                or_(
                    (WebhookEvent.status == EventStatus.PENDING)
                    & or_(WebhookEvent.enqueued_at.is_(None), WebhookEvent.enqueued_at < stale),
                    (WebhookEvent.status == EventStatus.RETRYING)
                    & (WebhookEvent.next_attempt_at < stale),
                    (WebhookEvent.status == EventStatus.PROCESSING)
                    & (WebhookEvent.lease_expires_at < max(now, abandoned)),
                )
            )
            .limit(5000)
            .with_for_update(skip_locked=True)
        ).all()
        # A pending event needs its queue drained, not a message of its own: one drain per
        # queue (a drain takes every pending event of it). The others are single attempts.
        drains = set()
        for row in rows:
            if row.status == EventStatus.PENDING:
                drains.add(queue_for(row.type))
            else:
                enqueue(app, row.webhook_id, row.type)
        for queue in sorted(drains):
            send_drain(app, queue)
        by_status: dict[str, list[str]] = {}
        for row in rows:
            by_status.setdefault(row.status, []).append(row.webhook_id)
        next_look = now + timedelta(seconds=settings.redrive_after_seconds)
        for status, values in (
            (EventStatus.PENDING, {"enqueued_at": now}),
            (EventStatus.RETRYING, {"next_attempt_at": next_look}),
            (EventStatus.PROCESSING, {"lease_expires_at": now}),
        ):
            if by_status.get(status):
                session.execute(
                    update(WebhookEvent)
                    .where(
                        WebhookEvent.webhook_id.in_(by_status[status]),
                        WebhookEvent.status == status,
                    )
                    .values(**values)
                )
    if rows:
        reclaimed = len(by_status.get(EventStatus.PROCESSING, []))
        log.info(
            "re-drove events",
            extra={"step": "redrive", "count": len(rows), "reclaimed": reclaimed},
        )
    return len(rows)


class _WakeFlags:
    """This process's Redis client for the wake flags (shared/queue.py), made after the fork."""

    def __init__(self) -> None:
        self._held: tuple[int, redis.Redis] | None = None

    def client(self) -> redis.Redis | None:
        if urlsplit(settings.redis_url).scheme not in ("redis", "rediss"):
            return None
        if self._held is None or self._held[0] != os.getpid():
            client = redis.Redis.from_url(
                settings.redis_url, socket_timeout=5, socket_connect_timeout=5
            )
            self._held = (os.getpid(), client)
        return self._held[1]


wake_flags = _WakeFlags()


@app.task(name=DRAIN, bind=True, max_retries=None, acks_late=True)
def drain(self: Task, queue: str, continued: bool = False) -> int:
    """Apply the ready events of `queue` in batches until none is left; returns how many.

    Each batch is one claim (`claim_batch`: up to DRAIN_BATCH_SIZE, never waiting to fill)
    and one transaction, an event's finish and effects in a savepoint of their own. When a
    drain's first batch comes back full it queues one more drain, unless one is waiting
    already, so that another worker process joins; after DRAIN_BUDGET_SECONDS it hands over
    to a drain queued behind the others (`continued`), so a worker serving several queues
    turns to them during a long backlog. Finding its queue empty, it deletes the queue's wake
    flag and looks once more: an event recorded before the flag went is found by that look,
    one recorded after it wakes a drain of its own.
    """
    factory = database.sessions()
    started = time.monotonic()
    flag_cleared = False
    first = True
    done = 0
    while True:
        try:
            claims = claim_batch(factory, queue, settings.drain_batch_size, settings.lease_seconds)
        except Exception as exc:
            # Nothing was claimed (database down?): drain later, the wake flag still set.
            countdown = backoff_seconds(min(self.request.retries + 1, 16), settings)
            log.warning(
                "claim failed",
                extra={"step": "retry", "queue": queue, "error": describe(exc)},
            )
            raise self.retry(countdown=countdown, exc=exc) from None
        if not claims:
            if flag_cleared:
                return done
            flag_cleared = clear_wake(queue)
            if not flag_cleared:
                return done  # the flag's TTL, or beat's re-drive, wakes the next drain
            continue
        if first and not continued and len(claims) == settings.drain_batch_size:
            call_for_help(queue)
        first = False
        done += drain_batch(self, factory, claims)
        if time.monotonic() - started >= settings.drain_budget_seconds:
            try:
                send_drain(app, queue, continued=True)
            except Exception as exc:
                # The wake flag's TTL, then beat's re-drive of the pending events, wake it.
                log.warning(
                    "could not hand the drain over",
                    extra={"step": "retry", "queue": queue, "error": describe(exc)},
                )
            return done


def drain_batch(task: Task, factory: sessionmaker[Session], claims: list[Claim]) -> int:
    """Apply a batch and settle its failures in one transaction, then log and retry them."""
    fields: dict[str, dict[str, Any]] = {
        c.webhook_id: {"webhook_id": c.webhook_id, "type": c.type, "attempt": c.attempt}
        for c in claims
    }
    spent = [c for c in claims if c.attempt > settings.max_attempts]
    fresh = [c for c in claims if c.attempt <= settings.max_attempts]
    for claim in fresh:
        log_step(log, "processing", **fields[claim.webhook_id])
    try:
        try:
            results, dead, retries = settle_batch(factory, fresh, spent, isolate=False)
        except BatchFailed:
            # One of them raised: everything rolled back; again, a savepoint each.
            results, dead, retries = settle_batch(factory, fresh, spent, isolate=True)
    except Exception as exc:
        # The transaction did not survive (connection lost): nothing of the batch committed,
        # every claim is `processing` with its attempt counted. Each retries on its own.
        for claim in claims:
            retry_alone(claim, backoff_seconds(claim.attempt, settings), exc, fields)
        return 0
    applied = 0
    for result in results:
        if isinstance(result, Applied):
            applied += 1
            status = str(result.status)
            log_step(log, status, outcome=result.outcome, **fields[result.claim.webhook_id])
    for claim, error in dead:
        log_step(log, "dead", level=logging.WARNING, error=error, **fields[claim.webhook_id])
    for claim, countdown, raised in retries:
        retry_alone(claim, countdown, raised, fields, settled=True)
    return applied + len(dead)


def settle_batch(
    factory: sessionmaker[Session], fresh: list[Claim], spent: list[Claim], *, isolate: bool
) -> tuple[list[Result], list[tuple[Claim, str]], list[tuple[Claim, float, BaseException]]]:
    """One transaction: apply `fresh`, bury `spent`, and settle the failed as retrying or dead.

    Returns the results, the events buried and the retries to send once it committed.
    """
    retries: list[tuple[Claim, float, BaseException]] = []
    dead: list[tuple[Claim, str]] = []
    with transaction(factory) as session:
        results = apply_batch(session, fresh, isolate=isolate)
        for claim in spent:
            # As in process_event: earlier attempts ended without a written verdict.
            error = f"gave up after {settings.max_attempts} attempts"
            error += f"; last error: {claim.last_error}" if claim.last_error else ""
            if settle_in(
                session, claim, status=EventStatus.DEAD, error=error, attempts=claim.attempt - 1
            ):
                dead.append((claim, error))
        for result in results:
            if not isinstance(result, Failed):
                continue
            claim, raised = result.claim, result.error
            failure = classify(raised)
            error = str(raised) if failure is Failure.PERMANENT else describe(raised)
            if failure is Failure.PERMANENT or claim.attempt >= settings.max_attempts:
                if settle_in(session, claim, status=EventStatus.DEAD, error=error):
                    dead.append((claim, error))
                continue
            countdown = backoff_seconds(claim.attempt, settings)
            next_at = utcnow() + timedelta(seconds=countdown)
            if settle_in(
                session, claim, status=EventStatus.RETRYING, error=error, next_attempt_at=next_at
            ):
                retries.append((claim, countdown, raised))
    return results, dead, retries


def retry_alone(
    claim: Claim,
    countdown: float,
    exc: BaseException,
    fields: dict[str, dict[str, Any]],
    *,
    settled: bool = False,
) -> None:
    """Send a batch's failed event its own `process_event`, as that task's retry would."""
    error = describe(exc)
    if not settled:
        try:
            held = settle_failure(
                database.sessions(),
                claim,
                status=EventStatus.RETRYING,
                error=error,
                next_attempt_at=utcnow() + timedelta(seconds=countdown),
            )
        except Exception:
            held = True  # not written: the message's after_attempt still lets it claim
        if not held:
            return  # the batch committed after all, or another attempt took it over
    log_step(
        log,
        "retry",
        level=logging.WARNING,
        error=error,
        failure=str(classify(exc)),
        countdown=round(countdown, 2),
        **fields[claim.webhook_id],
    )
    # Redis away: the event, `retrying` (or its claim, stale), is re-driven by beat.
    with contextlib.suppress(Exception):
        process_event.apply_async(
            args=[claim.webhook_id],
            kwargs={"after_attempt": claim.attempt},
            countdown=countdown,
            queue=queue_for(claim.type),
        )


def clear_wake(queue: str) -> bool:
    """Delete the queue's wake flag; False when Redis cannot be reached."""
    client = wake_flags.client()
    if client is None:
        return True
    try:
        client.delete(wake_key(queue))
    except redis.RedisError:
        return False
    return True


def call_for_help(queue: str) -> None:
    """Queue one more drain of `queue`, unless a message is waiting there already."""
    client = wake_flags.client()
    try:
        if client is not None and client.llen(queue) > 0:
            return
        send_drain(app, queue)
    except Exception as exc:
        log.debug("could not call for help", extra={"queue": queue, "error": describe(exc)})


app.conf.beat_schedule = {
    "redrive-stuck-events": {"task": REDRIVE, "schedule": settings.redrive_interval_seconds},
}
