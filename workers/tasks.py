"""The Celery edge: the drain that applies a queue's ready events in batches, the task that
processes one event (retries, re-drives, replays), and beat's re-drive."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis
from celery import Task
from celery.signals import worker_process_init
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from shared import lifecycle
from shared.bodies import ensure_ahead
from shared.catalog import queue_for
from shared.db import transaction, utcnow
from shared.logs import get_logger, log_step
from shared.models import DeliveryStatus, EventStatus, WebhookEvent
from shared.queue import (
    DELIVER_CHANGE,
    DRAIN,
    PROCESS_EVENT,
    PURGE,
    RECONCILE,
    REDRIVE,
    REDRIVE_DELIVERIES,
    enqueue,
    enqueue_deliveries,
    send_drain,
    wake_key,
)
from shared.settings import ConfigError
from workers import outbound
from workers.app import app, settings
from workers.claims import (
    DELIVERIES_MADE,
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
    pending_left,
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
            status, outcome = apply_event(session, claim, OUTBOUND_URLS)
            deliveries: list[int] = session.info.get(DELIVERIES_MADE, [])
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
    signal_deliveries(deliveries)
    return str(status)


def signal_deliveries(delivery_ids: list[int]) -> None:
    """Queue the deliveries just committed; if Redis is away, beat re-drives them."""
    if not delivery_ids:
        return
    try:
        enqueue_deliveries(app, delivery_ids, retry=False)
    except Exception as exc:
        log.warning(
            "could not queue outbound deliveries",
            extra={"step": "outbound", "count": len(delivery_ids), "error": describe(exc)},
        )


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


@app.task(name=RECONCILE, ignore_result=True)
def reconcile_with_dodo() -> int:
    """Beat's periodic `dodo-webhooks reconcile` (RECONCILE_INTERVAL_SECONDS): every family;
    the run is written to `reconcile_runs`, which /metrics reads."""
    from shared.reconcile import AlreadyRunning, ReconcileError, reconcile

    def wake(queue: str) -> None:
        send_drain(app, queue)

    try:
        report = reconcile(settings, database.sessions(), wake=wake, trigger="beat")
    except AlreadyRunning:
        log.info("reconcile skipped: another run holds the lock", extra={"step": "reconcile"})
        return 0
    except (ReconcileError, ConfigError) as exc:
        log.warning("reconcile failed", extra={"step": "reconcile", "error": str(exc)})
        return -1
    log.info(
        "reconciled",
        extra={
            "step": "reconcile",
            "count": report.total("recorded"),
            "differences": report.total("missing") + report.total("differs"),
            "api_calls": report.api_calls,
        },
    )
    return report.total("recorded")


@app.task(name=PURGE, ignore_result=True)
def purge() -> int:
    """First record the customer and payment of events held from before migration 0006, which
    the erasure otherwise has to find by reading their bodies (`lifecycle.backfill_subjects`):
    it needs their bodies, so it goes before the purge. Then retention: remove old raw bodies
    and headers (RETENTION_DAYS): days of bodies dropped whole, and those kept in their
    event rows batch by batch.

    Each part stops after PURGE_RUN_SECONDS so that the re-drive, on the same queue, is not
    held up behind a long backlog; the task then sends itself again to carry on.
    """
    sessions = database.sessions()
    # The next days' partitions of bodies, retention or not (shared/bodies.py).
    ensure_ahead(sessions.kw["bind"])
    batch, budget, pause = (
        settings.purge_batch_size,
        settings.purge_run_seconds,
        settings.purge_pause_seconds,
    )
    backfill = lifecycle.backfill_subjects(
        sessions, batch_size=batch, run_seconds=budget, pause_seconds=pause
    )
    if backfill.filled:
        log.info(
            "recorded the customer and payment of older events",
            extra={"step": "purge", "count": backfill.filled},
        )
    if not backfill.complete:
        app.send_task(PURGE)
        return 0
    if settings.retention_days <= 0:
        return 0
    result = lifecycle.purge(
        sessions,
        retention_days=settings.retention_days,
        batch_size=batch,
        run_seconds=budget,
        pause_seconds=pause,
    )
    if result.events:
        log.info(
            "purged raw bodies",
            extra={
                "step": "purge",
                "count": result.events,
                "bytes": result.bytes,
                "days": result.days,
            },
        )
    if not result.complete:
        app.send_task(PURGE)
    return result.events


OUTBOUND_URLS = tuple(settings.outbound_webhook_url)


class _Client:
    """One HTTP client per process, made after the fork; redirects are never followed."""

    def __init__(self) -> None:
        self._held: tuple[int, httpx.Client] | None = None

    def get(self) -> httpx.Client:
        if self._held is None or self._held[0] != os.getpid():
            client = httpx.Client(follow_redirects=False, trust_env=False)
            self._held = (os.getpid(), client)
        return self._held[1]


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


http = _Client()


# POSTs in flight per worker process. They run beside the process's tasks, so a receiver
# that is slow or times out holds threads, not the pool processes that apply events.
OUTBOUND_THREADS = 4


class _Senders:
    """One small thread pool per process, made after the fork."""

    def __init__(self) -> None:
        self._held: tuple[int, ThreadPoolExecutor] | None = None

    def get(self) -> ThreadPoolExecutor:
        if self._held is None or self._held[0] != os.getpid():
            pool = ThreadPoolExecutor(OUTBOUND_THREADS, thread_name_prefix="outbound")
            self._held = (os.getpid(), pool)
        return self._held[1]


senders = _Senders()


@app.task(name=DELIVER_CHANGE, ignore_result=True, acks_late=True)
def deliver_change(delivery_id: int) -> str:
    """Hand the delivery to this process's senders and return at once.

    If the process dies first, the delivery is still pending in the database, unclaimed,
    and beat re-drives it.
    """
    senders.get().submit(_deliver_logged, delivery_id)
    return "submitted"


def _deliver_logged(delivery_id: int) -> None:
    try:
        run_delivery(delivery_id)
    except Exception as exc:
        # Pending in the database (claimed or not): the lease runs out and beat re-drives it.
        log.warning(
            "outbound delivery failed",
            extra={"step": "outbound", "delivery_id": delivery_id, "error": describe(exc)},
        )


def run_delivery(delivery_id: int) -> str:
    """POST one change to one URL, in its entity's order; retry with backoff, then dead."""
    factory = database.sessions()
    engine = factory.kw["bind"]
    lease = settings.outbound_timeout_seconds + outbound.LEASE_SLACK_SECONDS
    claimed = outbound.claim_delivery(engine, delivery_id, lease)
    if claimed is None:
        return "skipped"  # done, not due, held by another attempt, or behind an earlier one
    fields = {"delivery_id": delivery_id, "attempt": claimed.attempt}
    if claimed.attempt > settings.outbound_max_attempts:
        outbound.give_up(
            factory, claimed, f"gave up after {settings.outbound_max_attempts} attempts"
        )
        log_step(log, "outbound dead", level=logging.WARNING, **fields)
        signal_deliveries([n] if (n := outbound.next_in_line(factory, claimed)) else [])
        return "dead"
    change = outbound.load_change(factory, claimed.change_seq)
    if change is None:
        outbound.give_up(factory, claimed, "the change is gone")
        return "dead"
    started_at = utcnow()
    answer = outbound.post_change(
        http.get(),
        claimed.url,
        settings.require_outbound_secret(),
        change,
        settings.outbound_timeout_seconds,
    )
    verdict = outbound.settle(factory, claimed, answer, started_at, settings)
    if verdict is None:
        return "skipped"
    log.info(
        "outbound attempt",
        extra={
            "step": "outbound",
            "status": str(verdict.status),
            "status_code": answer.status_code,
            **fields,
        },
    )
    if verdict.countdown is not None:
        # If Redis is away the delivery stays pending in the database: beat re-drives it.
        with contextlib.suppress(Exception):
            deliver_change.apply_async(args=[delivery_id], countdown=verdict.countdown, retry=False)
        return "retrying"
    following = outbound.next_in_line(factory, claimed)
    signal_deliveries([following] if following else [])
    if verdict.status == DeliveryStatus.DELIVERED and claimed.attempt > 1:
        # The URL answers again: what its failure held back goes now, not at beat's next look.
        signal_deliveries(outbound.due(factory, older_than=utcnow(), url=claimed.url, limit=200))
    return str(verdict.status)


@app.task(name=REDRIVE_DELIVERIES, ignore_result=True)
def redrive_deliveries() -> int:
    """Queue again pending deliveries that stopped moving (a lost message, a killed worker)."""
    if not OUTBOUND_URLS and not settings.outbound_webhook_secret:
        return 0
    stale = utcnow() - timedelta(seconds=settings.redrive_after_seconds)
    ids = outbound.due(database.sessions(), older_than=stale)
    signal_deliveries(ids)
    if ids:
        log.info("re-drove deliveries", extra={"step": "redrive", "count": len(ids)})
    return len(ids)


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
                if pending_left(factory, queue):
                    # Rows another transaction holds (an erasure, the purge): their wake was
                    # this drain, so look again once that transaction had time to end.
                    send_drain(app, queue, continued=True, countdown=1.0)
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
            results, dead, retries, deliveries = settle_batch(factory, fresh, spent, isolate=False)
        except BatchFailed:
            # One of them raised: everything rolled back; again, a savepoint each.
            results, dead, retries, deliveries = settle_batch(factory, fresh, spent, isolate=True)
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
    signal_deliveries(deliveries)
    return applied + len(dead)


def settle_batch(
    factory: sessionmaker[Session], fresh: list[Claim], spent: list[Claim], *, isolate: bool
) -> tuple[
    list[Result], list[tuple[Claim, str]], list[tuple[Claim, float, BaseException]], list[int]
]:
    """One transaction: apply `fresh`, bury `spent`, and settle the failed as retrying or dead.

    Returns the results, the events buried, the retries to send once it committed, and the
    outbound deliveries its changes made (the change feed's), to signal then too.
    """
    retries: list[tuple[Claim, float, BaseException]] = []
    dead: list[tuple[Claim, str]] = []
    with transaction(factory) as session:
        results = apply_batch(session, fresh, isolate=isolate, outbound_urls=OUTBOUND_URLS)
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
        deliveries: list[int] = session.info.get(DELIVERIES_MADE, [])
    return results, dead, retries, deliveries


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
    "purge-old-bodies": {"task": PURGE, "schedule": settings.purge_interval_seconds},
    "redrive-outbound-deliveries": {
        "task": REDRIVE_DELIVERIES,
        "schedule": settings.redrive_interval_seconds,
    },
}
if settings.reconcile_interval_seconds > 0:
    app.conf.beat_schedule["reconcile-with-dodo"] = {
        "task": RECONCILE,
        "schedule": settings.reconcile_interval_seconds,
        # A run still queued when the next is due is dropped, not stacked behind it.
        "options": {"expires": settings.reconcile_interval_seconds},
    }
