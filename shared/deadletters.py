"""Dead letters: find the events that gave up, and send them back through the same path."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import Session

from shared.db import utcnow
from shared.models import EventStatus, WebhookEvent

if TYPE_CHECKING:
    from celery import Celery

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_IDS = 1000

_AGE = re.compile(r"^(\d+)\s*([smhdw])$")
_AGE_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class FilterError(ValueError):
    """A filter that cannot be used, explained in one line (HTTP 400, or the CLI's error)."""


@dataclass(frozen=True)
class DeadLetterFilter:
    """Which dead events an operation is about; every field given narrows the selection."""

    type_glob: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    ids: tuple[str, ...] | None = None

    @property
    def is_empty(self) -> bool:
        return self.type_glob is None and self.since is None and self.until is None and not self.ids

    def where(self) -> list[ColumnElement[bool]]:
        clauses: list[ColumnElement[bool]] = [WebhookEvent.status == EventStatus.DEAD]
        if self.type_glob is not None:
            clauses.append(WebhookEvent.type.like(glob_to_like(self.type_glob), escape="\\"))
        if self.since is not None:
            clauses.append(WebhookEvent.received_at >= self.since)
        if self.until is not None:
            clauses.append(WebhookEvent.received_at < self.until)
        if self.ids is not None:
            clauses.append(WebhookEvent.webhook_id.in_(self.ids))
        return clauses


@dataclass
class Requeue:
    """What a retry found and changed; `requeued` is (webhook_id, type), to enqueue after commit."""

    matched: int
    requeued: list[tuple[str, str | None]] = field(default_factory=list)
    # Dead because their body is not a valid event envelope: a retry ends dead again, same reason.
    untyped: int = 0

    @property
    def ids(self) -> list[str]:
        return [webhook_id for webhook_id, _ in self.requeued]


def glob_to_like(glob: str) -> str:
    """`subscription.*` -> `subscription.%`: `*` and `?` are wildcards, `%` and `_` literal.

    Brackets are literal too (event types never hold them), unlike in fnmatch.
    """
    out = []
    for char in glob:
        if char in "\\%_":
            out.append("\\" + char)
        elif char == "*":
            out.append("%")
        elif char == "?":
            out.append("_")
        else:
            out.append(char)
    return "".join(out)


def parse_when(value: str | datetime | None, *, name: str) -> datetime | None:
    """An ISO-8601 time or date (UTC when no offset is given), or an age such as `2h` or `7d`."""
    if value is None or isinstance(value, datetime):
        return _aware(value) if value else None
    if not isinstance(value, str):
        raise FilterError(f"{name}: expected a string, got {type(value).__name__}")
    text = value.strip()
    age = _AGE.match(text)
    if age:
        return utcnow() - timedelta(**{_AGE_UNITS[age.group(2)]: int(age.group(1))})
    try:
        return _aware(datetime.fromisoformat(text))
    except ValueError:
        pass
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise FilterError(
            f"{name}: {_shown(text)} is not a time; give ISO-8601 "
            "(2026-01-31T12:00:00Z or 2026-01-31) or an age (30m, 2h, 7d)"
        ) from None
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def parse_limit(value: Any, *, default: int = DEFAULT_LIMIT) -> int:
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise FilterError(f"limit: expected an integer from 1 to {MAX_LIMIT}, got {value!r}")
    try:
        limit = int(value)
    except (TypeError, ValueError):
        raise FilterError(
            f"limit: expected an integer from 1 to {MAX_LIMIT}, got {_shown(str(value))}"
        ) from None
    if not 1 <= limit <= MAX_LIMIT:
        raise FilterError(f"limit: expected an integer from 1 to {MAX_LIMIT}, got {limit}")
    return limit


def make_filter(
    *,
    type_glob: str | None = None,
    since: str | datetime | None = None,
    until: str | datetime | None = None,
    ids: Sequence[str] | None = None,
) -> DeadLetterFilter:
    """Check and normalise the filters both the admin API and the CLI accept."""
    if type_glob is not None:
        if not isinstance(type_glob, str) or not type_glob.strip():
            raise FilterError("type: expected a non-empty event type or glob (subscription.*)")
        if len(type_glob) > 255:
            raise FilterError("type: longer than 255 characters")
        type_glob = type_glob.strip()
    start = parse_when(since, name="since")
    end = parse_when(until, name="until")
    if start and end and start >= end:
        raise FilterError(f"since ({start.isoformat()}) is not before until ({end.isoformat()})")
    id_tuple: tuple[str, ...] | None = None
    if ids is not None:
        if not isinstance(ids, list | tuple) or not all(isinstance(i, str) and i for i in ids):
            raise FilterError("ids: expected a list of webhook ids (non-empty strings)")
        id_tuple = tuple(dict.fromkeys(ids))
        if not id_tuple:
            raise FilterError("ids: the list is empty")
        if len(id_tuple) > MAX_IDS:
            raise FilterError(f"ids: at most {MAX_IDS} at a time")
    return DeadLetterFilter(type_glob, start, end, id_tuple)


def list_dead(
    session: Session,
    *,
    type_glob: str | None = None,
    since: str | datetime | None = None,
    until: str | datetime | None = None,
    ids: Sequence[str] | None = None,
    limit: int = DEFAULT_LIMIT,
) -> list[WebhookEvent]:
    """Dead events matching the filters, newest received first."""
    where = make_filter(type_glob=type_glob, since=since, until=until, ids=ids).where()
    limit = parse_limit(limit)
    rows = session.scalars(
        select(WebhookEvent)
        .where(*where)
        .order_by(WebhookEvent.received_at.desc(), WebhookEvent.webhook_id.desc())
        .limit(limit)
    )
    return list(rows)


def count_dead(
    session: Session,
    *,
    type_glob: str | None = None,
    since: str | datetime | None = None,
    until: str | datetime | None = None,
    ids: Sequence[str] | None = None,
) -> int:
    where = make_filter(type_glob=type_glob, since=since, until=until, ids=ids).where()
    return int(session.scalar(select(func.count()).select_from(WebhookEvent).where(*where)) or 0)


def requeue_dead(
    session: Session,
    *,
    type_glob: str | None = None,
    since: str | datetime | None = None,
    until: str | datetime | None = None,
    ids: Sequence[str] | None = None,
    everything: bool = False,
    dry_run: bool = False,
) -> Requeue:
    """Set matching dead events back to `pending` with a fresh attempt count, in the caller's
    transaction; the caller commits, then sends `requeued` with `enqueue_requeued`.

    `last_error` is kept, so the reason stays visible until the next attempt settles (a
    success clears it, a failure replaces it). With no filter at all, `everything=True` is
    required: a bare retry must not replay every dead letter by accident.
    """
    selection = make_filter(type_glob=type_glob, since=since, until=until, ids=ids)
    if selection.is_empty and not everything:
        raise FilterError(
            "no filter given: name ids, type, since or until, or ask for all dead letters "
            'explicitly (API: {"all": true}, CLI: --all)'
        )
    where = selection.where()
    untyped = int(
        session.scalar(
            select(func.count())
            .select_from(WebhookEvent)
            .where(*where, WebhookEvent.type.is_(None))
        )
        or 0
    )
    if dry_run:
        matched = int(
            session.scalar(select(func.count()).select_from(WebhookEvent).where(*where)) or 0
        )
        return Requeue(matched=matched, untyped=untyped)
    # One UPDATE that re-checks `status = dead` under the row lock: two concurrent retries of
    # the same event requeue it once, and the worker's claim makes even that harmless.
    rows = session.execute(
        update(WebhookEvent)
        .where(*where)
        .values(
            status=EventStatus.PENDING,
            attempts=0,
            outcome=None,
            lease_expires_at=None,
            next_attempt_at=None,
            processed_at=None,
            enqueued_at=utcnow(),
        )
        .returning(WebhookEvent.webhook_id, WebhookEvent.type)
        .execution_options(synchronize_session=False)
    ).all()
    requeued = [(row.webhook_id, row.type) for row in rows]
    return Requeue(matched=len(requeued), requeued=requeued, untyped=untyped)


@dataclass(frozen=True)
class Sent:
    queued: int
    # Why sending stopped (Redis unreachable); the rest stay `pending` for beat's re-drive.
    error: str | None = None


def enqueue_requeued(
    celery: Celery,
    requeued: Sequence[tuple[str, str | None]],
    *,
    ping: Callable[[], object] | None = None,
) -> Sent:
    """Wake the drain of each queue the events, already committed as `pending`, belong to:
    one message per queue, and the drain applies them in batches as it does deliveries (a
    replay of thousands after a fix is a backlog). Stops at the first failure, since the
    re-drive job queues whatever stays pending; `queued` counts the events whose drain was
    woken.

    `ping` (a Redis client's, with short timeouts) answers at once when Redis is away, where
    kombu would spend seconds reconnecting before giving up.
    """
    from shared.catalog import queue_for
    from shared.queue import send_drain

    if requeued and ping is not None:
        try:
            ping()
        except Exception as exc:
            return Sent(
                0, f"Redis (REDIS_URL): {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            )
    queued = 0
    for queue, count in sorted(Counter(queue_for(t) for _, t in requeued).items()):
        try:
            send_drain(celery, queue)
        except Exception as exc:
            return Sent(queued, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        queued += count
    return Sent(queued)


def requeue_notes(result: Requeue, sent: Sent | None, *, redrive_after_seconds: int) -> list[str]:
    """What an operator should know about a retry beyond the counts."""
    notes = []
    if result.untyped:
        notes.append(
            f"{result.untyped} of them have no valid event envelope (type null): "
            "they will go dead again with the same reason"
        )
    if sent is not None and sent.error is not None:
        waiting = len(result.requeued) - sent.queued
        notes.append(
            f"{waiting} event(s) are pending but could not be queued ({sent.error}); "
            f"beat's re-drive job queues them within about {redrive_after_seconds}s "
            "once Redis answers"
        )
    return notes


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "…")
