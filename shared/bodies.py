"""Where raw bodies live: `event_bodies`, one PostgreSQL partition per UTC day stored.

The ingest writes a delivery's body and headers into the partition of its `received_at`
(ingest/recording.py). Readers take `webhook_events.body` where it is set (rows recorded
before migration 0008, the dev server's SQLite, bodies kept past their day, erased ones) and
the partition's row otherwise. Retention drops a day's partition whole (`drop_day`), once
every event received that day finished longer ago than `RETENTION_DAYS`; the bodies that must
outlive it are copied into their event rows first. Dropping a table writes no WAL per row and
rewrites no page: the purge costs the ingest nothing it can feel (docs/data-lifecycle.md).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import cache
from typing import Any, Final, cast

from sqlalchemy import Engine, Select, Table, Update, bindparam, func, null, select, text, tuple_
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from shared.db import utcnow
from shared.models import (
    FINAL_STATUSES,
    PURGEABLE,
    EventBody,
    EventStatus,
    PurgedDay,
    WebhookEvent,
)

DAY: Final = timedelta(days=1)
# A day's partition is dropped once the day ended this long before the purge's cutoff, and a
# worker that finishes an event received longer ago than this copies its body into the event
# row first (workers/claims.py). Together: an event whose body goes with its day finished
# within LATE of being received, so before the cutoff, as RETENTION_DAYS says. Most finish
# within seconds; those an outage held up for longer are copied, and purged in place.
LATE: Final = timedelta(hours=1)
# Days of partitions kept ready beyond today (beat's purge makes them; the ingest makes
# today's itself if none is there).
AHEAD_DAYS: Final = 3
PARENT: Final = str(EventBody.__tablename__)
_NAME = re.compile(rf"^{PARENT}_(\d{{8}})$")
# pg_advisory_xact_lock's key for making partitions (b"dodobody"), and pg_try_advisory_lock's
# for dropping one (b"dododrop"): two ingest processes do not both attach today's, and two
# purges do not both detach the same day. Two keys: a drop waits for old snapshots, which
# making today's partition must not wait behind.
MAKE_LOCK: Final = int.from_bytes(b"dodobody", "big", signed=True)
DROP_LOCK: Final = int.from_bytes(b"dododrop", "big", signed=True)
# Events whose body a drop must keep: not finished, or dead.
UNFINISHED: Final = tuple(
    str(s) for s in EventStatus if s not in FINAL_STATUSES or s == EventStatus.DEAD
)
BODIES = cast(Table, EventBody.__table__)


@dataclass(frozen=True)
class Day:
    """One partition of `event_bodies`: the bodies stored on `day` (UTC)."""

    day: date
    detaching: bool = False

    @property
    def name(self) -> str:
        return f"{PARENT}_{self.day:%Y%m%d}"

    @property
    def start(self) -> datetime:
        return datetime(self.day.year, self.day.month, self.day.day, tzinfo=UTC)

    @property
    def end(self) -> datetime:
        return self.start + DAY


def is_day(table_name: str | None) -> bool:
    """Whether the table is one of `event_bodies`' partitions (made at run time, not in the
    models: Alembic's comparison leaves them out)."""
    return bool(table_name) and _NAME.match(str(table_name)) is not None


def include_object(obj: Any, name: str | None, kind: str, reflected: bool, other: Any) -> bool:
    """Alembic's filter: the days' partitions are not in the models (migrations/env.py)."""
    return not (kind == "table" and is_day(name))


def day_of(moment: datetime) -> date:
    return moment.astimezone(UTC).date()


def partitioned(bind: Session | Connection | Engine) -> bool:
    """True where bodies live in `event_bodies` (PostgreSQL); False on SQLite."""
    engine = bind.get_bind() if isinstance(bind, Session) else bind
    return engine.dialect.name == "postgresql"


def days(conn: Session | Connection) -> list[Day]:
    """The partitions there are, oldest first (with those a drop left half detached)."""
    rows = conn.execute(
        text(
            "SELECT c.relname, i.inhdetachpending FROM pg_inherits i"
            " JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = CAST(:parent AS regclass)"
        ),
        {"parent": PARENT},
    ).all()
    found = []
    for name, detaching in rows:
        match = _NAME.match(name)
        if match:
            found.append(Day(datetime.strptime(match[1], "%Y%m%d").date(), bool(detaching)))
    return sorted(found, key=lambda d: d.day)


def ensure_days(engine: Engine, first: date, last: date) -> list[Day]:
    """Make the partitions of the days from `first` to `last` that are not there; those made.

    `ATTACH PARTITION` takes a lock on `event_bodies` that the ingest's INSERTs and the
    workers' reads do not conflict with (CREATE TABLE … PARTITION OF would hold them all)."""
    made: list[Day] = []
    with engine.begin() as conn:
        conn.execute(text("SET LOCAL lock_timeout = '5s'"))
        conn.execute(select(text(f"pg_advisory_xact_lock({MAKE_LOCK})")))
        have = {d.day for d in days(conn)}
        day = first
        while day <= last:
            if day not in have:
                part = Day(day)
                conn.execute(
                    text(
                        f'CREATE TABLE IF NOT EXISTS "{part.name}"'
                        f" (LIKE {PARENT} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
                    )
                )
                conn.execute(
                    text(
                        f'ALTER TABLE {PARENT} ATTACH PARTITION "{part.name}"'
                        f" FOR VALUES FROM ('{part.start.isoformat()}')"
                        f" TO ('{part.end.isoformat()}')"
                    )
                )
                made.append(part)
            day += DAY
    return made


def ensure_ahead(engine: Engine, now: datetime | None = None) -> list[Day]:
    """Today's partition and AHEAD_DAYS more (no-op on SQLite)."""
    if not partitioned(engine):
        return []
    today = day_of(now or utcnow())
    return ensure_days(engine, today, today + timedelta(days=AHEAD_DAYS))


def droppable(conn: Session | Connection, cutoff: datetime) -> list[Day]:
    """The days whose every event received then finished before `cutoff`, oldest first;
    before them any day a drop left half detached (its bodies are out of sight already, and
    PostgreSQL detaches no other partition of the table until it is finished)."""
    found = days(conn)
    return [d for d in found if d.detaching] + [
        d for d in found if not d.detaching and d.end + LATE <= cutoff
    ]


def keep_unfinished(session: Session, day: Day) -> int:
    """Copy into their event rows the bodies of the day's events that must outlive it
    (pending, processing, retrying or dead); how many. In the caller's transaction."""
    result = session.execute(
        text(
            f"UPDATE {WebhookEvent.__tablename__} AS e SET body = b.body, headers = b.headers"
            f' FROM "{day.name}" AS b'
            " WHERE e.status IN :unfinished AND e.received_at >= :start"
            " AND e.received_at < :end AND e.body IS NULL"
            " AND b.webhook_id = e.webhook_id AND b.stored_at = e.received_at"
            " AND b.body IS NOT NULL"
        ).bindparams(bindparam("unfinished", expanding=True)),
        {"unfinished": list(UNFINISHED), "start": day.start, "end": day.end},
    )
    return int(getattr(result, "rowcount", 0) or 0)


def count_day(session: Session, day: Day) -> tuple[int, int]:
    """How many processed or ignored events' bodies only the day's partition holds (a
    drop's count), and the partition's size on disk."""
    events = session.scalar(
        select(func.count())
        .select_from(WebhookEvent)
        .where(
            WebhookEvent.received_at >= day.start,
            WebhookEvent.received_at < day.end,
            WebhookEvent.body.is_(None),
            WebhookEvent.status.in_([str(s) for s in PURGEABLE]),
        )
    )
    size = session.scalar(select(text(f"pg_total_relation_size('\"{day.name}\"')")))
    return int(events or 0), int(size or 0)


def drop_day(
    engine: Engine, day: Day, on_drop: Callable[[Session, int, int], None]
) -> tuple[int, int] | None:
    """Drop one day of bodies; the events and bytes that went with it, or None when another
    run dropped it first.

    Under the drop lock, held by one run at a time (a second waits for it, then finds the
    day gone): the bodies that must outlive the day go into their rows (`keep_unfinished`),
    the day is counted, its partition detached (CONCURRENTLY: the ingest and the workers
    never wait; FINALIZE where a detach was interrupted) and dropped, with `on_drop(session,
    events, bytes)` in the dropping transaction (the counters)."""
    with engine.connect() as raw:
        conn = raw.execution_options(isolation_level="AUTOCOMMIT")
        conn.execute(select(text(f"pg_advisory_lock({DROP_LOCK})")))
        try:
            current = {d.day: d for d in days(conn)}.get(day.day)
            if current is None:
                return None
            with Session(bind=engine) as session, session.begin():
                keep_unfinished(session, day)
                events, size = count_day(session, day)
            mode = "FINALIZE" if current.detaching else "CONCURRENTLY"
            conn.execute(text(f'ALTER TABLE {PARENT} DETACH PARTITION "{day.name}" {mode}'))
            with Session(bind=engine) as session, session.begin():
                session.execute(text(f'DROP TABLE "{day.name}"'))
                on_drop(session, events, size)
            return events, size
        finally:
            conn.execute(select(text(f"pg_advisory_unlock({DROP_LOCK})")))


def stored(
    session: Session | Connection, keys: Iterable[tuple[str, datetime]]
) -> dict[str, tuple[bytes | None, dict[str, str] | None]]:
    """The partition rows of these events (webhook id, `received_at`): body and headers."""
    wanted = list(keys)
    if not wanted or not partitioned(session):
        return {}
    found: dict[str, tuple[bytes | None, dict[str, str] | None]] = {}
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        rows = session.execute(
            select(BODIES.c.webhook_id, BODIES.c.body, BODIES.c.headers).where(
                # The stored_at list lets PostgreSQL open only those days' partitions.
                BODIES.c.stored_at.in_(sorted({at for _, at in chunk})),
                tuple_(BODIES.c.webhook_id, BODIES.c.stored_at).in_(chunk),
            )
        )
        for webhook_id, body, headers in rows:
            found[webhook_id] = (body, headers)
    return found


@cache
def reading_body(statement: Update) -> Select[Any]:
    """`statement` (an UPDATE returning `webhook_id`, `body` and `received_at`) with each
    body its row does not hold read from its day's partition, in the same statement: a
    claim stays one round trip. The partition's row is looked up by a subquery run per
    returned row, and only where the row's own body is NULL (COALESCE stops at the first
    value), so PostgreSQL opens just that day's partition, by its primary key, whatever the
    plan: a join could hash all the days kept."""
    updated = statement.cte("updated")
    in_partition = (
        select(BODIES.c.body)
        .where(
            BODIES.c.webhook_id == updated.c.webhook_id,
            BODIES.c.stored_at == updated.c.received_at,
        )
        .scalar_subquery()
    )
    return select(
        *(
            func.coalesce(column, in_partition).label("body") if column.name == "body" else column
            for column in updated.c
        )
    )


def fill(session: Session, events: Sequence[WebhookEvent]) -> None:
    """Give loaded events whose row holds no body the one their day's partition holds, or,
    where their day was dropped, when (`purged_at`): for reading only (the session does not
    see either as a change to write)."""
    missing = [e for e in events if e.body is None]
    found = stored(session, [(e.webhook_id, e.received_at) for e in missing])
    dropped = _purged_days(session, {day_of(e.received_at) for e in missing if e.purged_at is None})
    for event in missing:
        body, headers = found.get(event.webhook_id, (None, None))
        if body is not None:
            set_committed_value(event, "body", body)
            set_committed_value(event, "headers", headers)
        elif event.purged_at is None and day_of(event.received_at) in dropped:
            set_committed_value(event, "purged_at", dropped[day_of(event.received_at)])


def _purged_days(session: Session, wanted: set[date]) -> dict[date, datetime]:
    if not wanted or not partitioned(session):
        return {}
    rows = session.execute(
        select(PurgedDay.day, PurgedDay.purged_at).where(PurgedDay.day.in_(sorted(wanted)))
    )
    return {day: at for day, at in rows}


def record_drop(session: Session, day: Day, events: int, size: int) -> None:
    """That the day's bodies were dropped, in the dropping transaction."""
    session.add(PurgedDay(day=day.day, purged_at=utcnow(), events=events, bytes=size))


def keep_in_row(session: Session, webhook_id: str, received_at: datetime) -> None:
    """Copy the event's partition body into its row (it finished late: its day may go
    before RETENTION_DAYS have passed since it finished). In the caller's transaction."""
    if not partitioned(session):
        return
    session.execute(
        text(
            f"UPDATE {WebhookEvent.__tablename__} AS e SET body = b.body, headers = b.headers"
            f" FROM {PARENT} AS b WHERE e.webhook_id = :id AND e.body IS NULL"
            " AND b.webhook_id = :id AND b.stored_at = :at AND b.body IS NOT NULL"
        ),
        {"id": webhook_id, "at": received_at},
    )


def store(
    session: Session,
    webhook_id: str,
    received_at: datetime,
    body: bytes,
    headers: dict[str, str],
) -> None:
    """Keep a new event's body and headers in its day's partition (reconciliation's events;
    the ingest does the same in its one statement, ingest/recording.py)."""
    session.execute(
        BODIES.insert().values(
            webhook_id=webhook_id, stored_at=received_at, body=body, headers=headers
        )
    )


def replace_stored(
    session: Session,
    webhook_id: str,
    received_at: datetime,
    body: bytes | None,
    headers: dict[str, str] | None,
) -> None:
    """Rewrite an event's body and headers in its day's partition (the erasure)."""
    session.execute(
        BODIES.update()
        .where(BODIES.c.webhook_id == webhook_id, BODIES.c.stored_at == received_at)
        .values(
            body=body if body is not None else null(),
            headers=headers if headers is not None else null(),
        )
    )
