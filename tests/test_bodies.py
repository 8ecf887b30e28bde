"""Raw bodies by the day stored (shared/bodies.py): made, read, kept, erased and dropped."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import psycopg.errors
import pytest
from alembic import command
from sqlalchemy import Engine, select, text, update
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from cli.db import alembic_config, upgrade
from ingest.recording import record_delivery
from shared.bodies import AHEAD_DAYS, Day, day_of, days
from shared.db import make_engine, make_sessionmaker, utcnow
from shared.lifecycle import (
    PURGED_EVENTS,
    PurgeResult,
    erase_customer,
    lifecycle_totals,
    purge,
)
from shared.models import EventStatus, PurgedDay, WebhookEvent
from tests.conftest import PG_ADMIN_URL
from tests.handlers.events import T0
from tests.lifecycle_support import ALICE, BOB, Feed, age, body_for
from tests.support import stored_event, throwaway_database, wait_until


def deliver(engine: Engine, webhook_id: str, body: bytes = b'{"type": "payout.sent"}') -> bool:
    """One delivery through the ingest's own recorder: True when it was new."""
    return record_delivery(
        engine,
        webhook_id=webhook_id,
        webhook_ts=int(T0.timestamp()),
        headers={"webhook-id": webhook_id},
        body=body,
        event_type="payout.sent",
        event_at=T0,
    )


def run_purge(engine: Engine) -> PurgeResult:
    return purge(make_sessionmaker(engine), retention_days=30, batch_size=500)


def partition_body(engine: Engine, day: Day, webhook_id: str) -> bytes | None:
    """The body the day's partition itself holds for the event (None: no row, or NULL)."""
    with engine.connect() as conn:
        body = conn.scalar(
            text(f'SELECT body FROM "{day.name}" WHERE webhook_id = :id'), {"id": webhook_id}
        )
    return None if body is None else bytes(body)


def row_of(engine: Engine, webhook_id: str) -> WebhookEvent:
    """The event's row as stored, nothing filled in from a partition."""
    with Session(engine, expire_on_commit=False) as session:
        row = session.get(WebhookEvent, webhook_id)
        assert row is not None, webhook_id
        return row


def day_of_event(engine: Engine, webhook_id: str) -> Day:
    return Day(day_of(row_of(engine, webhook_id).received_at))


def exists(engine: Engine, day: Day) -> bool:
    with engine.connect() as conn:
        return conn.scalar(select(text(f"to_regclass('\"{day.name}\"')"))) is not None


@contextmanager
def snapshot_held(engine: Engine) -> Iterator[Connection]:
    """A transaction that has read `event_bodies` and stays open (a long report, a
    pg_dump): a DETACH … CONCURRENTLY waits for it to end."""
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
        conn.begin()
        conn.execute(text("SELECT count(*) FROM event_bodies")).scalar()
        try:
            yield conn
        finally:
            conn.rollback()


def detach_waiting(engine: Engine) -> int | None:
    """The pid of a backend of this database whose DETACH PARTITION waits, if one does."""
    with engine.connect() as conn:
        return conn.scalar(
            text(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND query ILIKE '%DETACH PARTITION%' AND state = 'active'"
                " AND wait_event_type IS NOT NULL AND pid <> pg_backend_pid()"
            )
        )


@pytest.fixture
def impatient_ingest(pg_url: str) -> Iterator[Engine]:
    """The session database for the ingest's recorder, with a lock_timeout (its connections
    take their options from the URL): a delivery queued behind a lock fails the test
    instead of hanging it."""
    url = make_url(pg_url).update_query_dict({"options": "-c lock_timeout=2s"})
    engine = make_engine(url.render_as_string(hide_password=False))
    yield engine
    engine.dispose()


class InThread(threading.Thread):
    """Runs `work` and keeps its result or its exception for the test's thread."""

    def __init__(self, work: Any) -> None:
        super().__init__(daemon=True)
        self.work = work
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.work()
        except BaseException as exc:  # handed to the test's thread, which asserts on it
            self.error = exc

    def outcome(self, timeout: float = 20.0) -> Any:
        self.join(timeout)
        assert not self.is_alive(), "still running"
        if self.error is not None:
            raise self.error
        return self.result


class TestTodaysPartition:
    """The ingest writes into today's partition, and makes it when there is none."""

    def test_the_ingest_makes_todays_partition_and_the_next_days_when_none_is_there(
        self, clean_db: Engine
    ) -> None:
        """Beat's purge makes the days ahead; when it has not run (a new install left for
        days, beat down), a delivery must still be recorded, not answered 500."""
        with clean_db.begin() as conn:
            for day in days(conn):
                conn.execute(text(f'DROP TABLE "{day.name}"'))
            assert days(conn) == []

        assert deliver(clean_db, "msg_no_day", b'{"first": true}') is True

        today = day_of(utcnow())
        assert partition_body(clean_db, Day(today), "msg_no_day") == b'{"first": true}'
        assert row_of(clean_db, "msg_no_day").body is None
        with clean_db.connect() as conn:
            made = [d.day for d in days(conn)]
        assert made == [today + timedelta(days=n) for n in range(AHEAD_DAYS + 1)]


class TestDroppedDay:
    """What is left of a day's events after their partition was dropped."""

    def test_a_dodo_retry_of_a_delivery_whose_day_was_dropped_is_a_duplicate_and_applies_nothing(
        self, clean_db: Engine
    ) -> None:
        """The event row outlives its body: a retry Dodo sends weeks later is still known,
        and neither a new body nor a second application comes of it."""
        feed = Feed(clean_db)
        webhook_id = feed.send(body_for("payment.succeeded", ALICE, T0, payment_id="pay_d"))
        age(clean_db, [webhook_id], 40)
        day = day_of_event(clean_db, webhook_id)
        before = row_of(clean_db, webhook_id)

        assert run_purge(clean_db).days == 1
        assert deliver(clean_db, webhook_id) is False

        after = row_of(clean_db, webhook_id)
        assert (after.status, after.attempts, after.processed_at) == (
            EventStatus.PROCESSED,
            before.attempts,
            before.processed_at,
        )
        with clean_db.connect() as conn:
            assert (
                conn.scalar(
                    text("SELECT count(*) FROM event_bodies WHERE webhook_id = :id"),
                    {"id": webhook_id},
                )
                == 0
            )
        seen = stored_event(clean_db, webhook_id)
        assert (seen.body, seen.headers) == (None, None)
        assert seen.purged_at is not None
        with Session(clean_db) as session:
            dropped = session.get(PurgedDay, day.day)
            assert dropped is not None and dropped.events == 1
            assert seen.purged_at == dropped.purged_at

    def test_an_event_finished_late_keeps_its_body_past_its_days_drop_then_is_purged_in_place(
        self, clean_db: Engine
    ) -> None:
        """An event an outage held up finished long after its day: dropping the day with it
        would take its body before RETENTION_DAYS from its finish. The worker keeps a copy
        in the row, which the purge in place empties in its time."""
        feed = Feed(clean_db)
        envelope = body_for("payment.succeeded", ALICE, T0, payment_id="pay_late")
        webhook_id = feed.record(envelope)
        original = json.dumps(envelope).encode()
        age(clean_db, [webhook_id], 40)
        day = day_of_event(clean_db, webhook_id)
        assert feed.apply(webhook_id) == EventStatus.PROCESSED
        assert row_of(clean_db, webhook_id).body == original  # the worker's copy

        first = run_purge(clean_db)

        assert (first.days, first.events) == (1, 0)
        assert not exists(clean_db, day)
        kept = stored_event(clean_db, webhook_id)
        assert (kept.body, kept.purged_at) == (original, None)

        with clean_db.begin() as conn:
            conn.execute(
                update(WebhookEvent)
                .where(WebhookEvent.webhook_id == webhook_id)
                .values(processed_at=utcnow() - timedelta(days=40))
            )
        second = run_purge(clean_db)

        assert (second.days, second.events) == (0, 1)
        purged = stored_event(clean_db, webhook_id)
        assert (purged.body, purged.headers) == (None, None)
        assert purged.purged_at is not None

    def test_unfinished_and_dead_events_keep_their_bodies_when_their_day_is_dropped(
        self, clean_db: Engine
    ) -> None:
        """A dead letter must stay replayable, and a pending event must still be applied
        with its body, however old its day."""
        feed = Feed(clean_db)
        pending = feed.record(body_for("payment.succeeded", ALICE, T0, payment_id="pay_pend"))
        dead = feed.record(body_for("payment.succeeded", BOB, T0, payment_id="pay_dead"))
        with clean_db.begin() as conn:
            conn.execute(
                update(WebhookEvent)
                .where(WebhookEvent.webhook_id == dead)
                .values(status=EventStatus.DEAD, processed_at=utcnow(), last_error="boom")
            )
        bodies = {w: stored_event(clean_db, w).body for w in (pending, dead)}
        assert all(bodies.values())
        age(clean_db, [pending, dead], 40)
        day = day_of_event(clean_db, pending)

        result = run_purge(clean_db)

        assert (result.days, result.events) == (1, 0)
        assert not exists(clean_db, day)
        for webhook_id, body in bodies.items():
            assert row_of(clean_db, webhook_id).body == body
            kept = stored_event(clean_db, webhook_id)
            assert kept.body == body and kept.headers and kept.purged_at is None
        assert row_of(clean_db, dead).status == EventStatus.DEAD
        assert feed.apply(pending) == EventStatus.PROCESSED
        assert row_of(clean_db, pending).status == EventStatus.PROCESSED


class TestDrop:
    """Dropping a day: once, counted once, beside the ingest, finished when interrupted."""

    def test_two_purges_at_once_drop_each_day_once_and_count_it_once(
        self, clean_db: Engine
    ) -> None:
        """Beat's purge and an operator's may run together: each day goes once, and its
        events are counted once between them."""
        feed = Feed(clean_db)
        ids = [
            feed.send(body_for("payment.succeeded", ALICE, T0, payment_id=f"pay_two_{n}"))
            for n in range(6)
        ]
        for n, days_ago in enumerate((40, 41, 42)):
            age(clean_db, ids[2 * n : 2 * n + 2], days_ago)
        barrier = threading.Barrier(2)

        def one() -> PurgeResult:
            barrier.wait(timeout=10)
            return run_purge(clean_db)

        runs = [InThread(one) for _ in range(2)]
        for run in runs:
            run.start()
        results = [run.outcome() for run in runs]

        assert sum(r.days for r in results) == 3
        assert sum(r.events for r in results) == 6
        with Session(clean_db) as session:
            assert lifecycle_totals(session)[PURGED_EVENTS] == 6
            dropped = session.scalars(select(PurgedDay)).all()
        assert len(dropped) == 3 and sum(d.events for d in dropped) == 6
        with clean_db.connect() as conn:
            assert all(d.day >= day_of(utcnow()) for d in days(conn))

    def test_a_purge_passes_over_a_day_another_purge_dropped_after_it_started(
        self, clean_db: Engine
    ) -> None:
        """A run lists the droppable days once, at its start: one that another run drops
        meanwhile must be passed over, not fail the run (and the in-place purge after it).
        The same race as above, made certain: the other run goes between two days."""
        feed = Feed(clean_db)
        ids = [
            feed.send(body_for("payment.succeeded", BOB, T0, payment_id=f"pay_gone_{n}"))
            for n in range(3)
        ]
        for webhook_id, days_ago in zip(ids, (40, 41, 42), strict=True):
            age(clean_db, [webhook_id], days_ago)
        other: list[PurgeResult] = []

        def meanwhile(_: PurgeResult) -> None:
            if not other:
                other.append(run_purge(clean_db))

        first = purge(
            make_sessionmaker(clean_db), retention_days=30, batch_size=500, progress=meanwhile
        )

        assert (first.days, other[0].days) == (1, 2)
        assert first.events + other[0].events == 3
        with Session(clean_db) as session:
            assert lifecycle_totals(session)[PURGED_EVENTS] == 3

    def test_a_drop_waiting_for_an_old_snapshot_never_holds_up_the_ingest(
        self, clean_db: Engine, impatient_ingest: Engine
    ) -> None:
        """DETACH … CONCURRENTLY waits for every transaction that used `event_bodies`; the
        deliveries meanwhile must be recorded as fast as ever (each within a second here:
        a functional bound, not a benchmark)."""
        feed = Feed(clean_db)
        old = feed.send(body_for("payment.succeeded", ALICE, T0, payment_id="pay_snap"))
        age(clean_db, [old], 40)
        day = day_of_event(clean_db, old)

        with snapshot_held(clean_db) as holder:
            run = InThread(lambda: run_purge(clean_db))
            run.start()
            wait_until(lambda: detach_waiting(clean_db), timeout=10, what="the DETACH to wait")
            took = []
            for n in range(20):
                started = time.monotonic()
                assert deliver(impatient_ingest, f"msg_during_{n:02d}") is True
                took.append(time.monotonic() - started)
            assert max(took) < 1.0, took
            assert run.is_alive() and detach_waiting(clean_db)
            holder.commit()
        result = run.outcome()

        assert (result.days, result.events) == (1, 1)
        assert not exists(clean_db, day)
        with clean_db.connect() as conn:
            recorded = conn.scalar(
                text(
                    "SELECT count(*) FROM event_bodies WHERE webhook_id LIKE 'msg_during_%'"
                    " AND body IS NOT NULL"
                )
            )
        assert recorded == 20

    @pytest.mark.parametrize("older_day", [False, True])
    def test_a_detach_interrupted_halfway_is_finished_by_the_next_run(
        self, clean_db: Engine, older_day: bool
    ) -> None:
        """A purge killed while its DETACH waited leaves the partition pending detach, which
        a plain DETACH refuses: the next run must FINALIZE it, then drop it; and first, as
        PostgreSQL detaches no other partition of the table meanwhile (`older_day`: an
        older day still attached, which the run would otherwise take first)."""
        feed = Feed(clean_db)
        old = feed.send(body_for("payment.succeeded", ALICE, T0, payment_id="pay_cut"))
        age(clean_db, [old], 40)
        day = day_of_event(clean_db, old)
        if older_day:
            older = feed.send(body_for("payment.succeeded", ALICE, T0, payment_id="pay_older"))
            age(clean_db, [older], 41)

        with snapshot_held(clean_db) as holder, clean_db.connect() as raw:
            detacher = raw.execution_options(isolation_level="AUTOCOMMIT")
            pid = detacher.scalar(text("SELECT pg_backend_pid()"))

            def detach() -> None:
                detacher.execute(
                    text(f'ALTER TABLE event_bodies DETACH PARTITION "{day.name}" CONCURRENTLY')
                )

            run = InThread(detach)
            run.start()
            assert wait_until(lambda: detach_waiting(clean_db), timeout=10) == pid
            with clean_db.connect() as conn:
                assert conn.scalar(text("SELECT pg_cancel_backend(:pid)"), {"pid": pid})
            with pytest.raises(DBAPIError) as cancelled:
                run.outcome()
            assert isinstance(cancelled.value.orig, psycopg.errors.QueryCanceled)
            with clean_db.connect() as conn:
                assert Day(day.day, detaching=True) in days(conn)
            holder.commit()

        result = run_purge(clean_db)

        dropped = 2 if older_day else 1
        assert (result.days, result.events) == (dropped, dropped)
        assert not exists(clean_db, day)
        with clean_db.connect() as conn:
            assert day.day not in {d.day for d in days(conn)}
            assert len(days(conn)) == AHEAD_DAYS + 1  # today's and the next days' only


class TestErasure:
    """The erasure rewrites a body where it lives."""

    def test_an_erasure_rewrites_the_customers_bodies_in_their_days_partition(
        self, clean_db: Engine
    ) -> None:
        """Copying the erased body into the row would leave the original in the partition
        until its day is dropped: it must be rewritten there, and only the customer's."""
        feed = Feed(clean_db)
        alice = feed.send(body_for("payment.succeeded", ALICE, T0, payment_id="pay_a"))
        bob = feed.send(body_for("payment.succeeded", BOB, T0, payment_id="pay_b"))
        day = day_of_event(clean_db, alice)
        bobs = partition_body(clean_db, day, bob)
        assert bobs is not None
        before = partition_body(clean_db, day, alice)
        assert before is not None and ALICE.email.encode() in before

        erase_customer(make_sessionmaker(clean_db), ALICE.customer_id, requested_by="test")

        erased = partition_body(clean_db, day, alice)
        assert erased is not None
        text_of = erased.decode()
        assert json.loads(text_of)["data"]["payment_id"] == "pay_a"
        for secret in (ALICE.email, ALICE.name, ALICE.phone, ALICE.street):
            assert secret not in text_of
        assert partition_body(clean_db, day, bob) == bobs
        row = row_of(clean_db, alice)
        assert (row.body, row.headers) == (None, None)
        assert row.erased_at is not None
        assert row_of(clean_db, bob).erased_at is None
        assert stored_event(clean_db, alice).body == erased


class TestMigration:
    """Migration 0008 and its way back."""

    def test_the_downgrade_of_0008_puts_bodies_back_into_their_rows(self) -> None:
        """Going back to 0007 drops `event_bodies`: the bodies recorded since must not go
        with it, and 0008 must apply again afterwards."""
        with throwaway_database(PG_ADMIN_URL, "dodo_0008", migrated=False) as url:
            upgrade(url, "head")
            engine = make_engine(url)
            try:
                assert deliver(engine, "msg_down", b'{"kept": true}') is True
                with engine.connect() as conn:
                    assert conn.scalar(text("SELECT body FROM webhook_events")) is None
                command.downgrade(alembic_config(url), "purge_in_place")
                with engine.connect() as conn:
                    row = conn.execute(text("SELECT body, headers FROM webhook_events")).one()
                    assert bytes(row.body) == b'{"kept": true}'
                    assert row.headers == {"webhook-id": "msg_down"}
                    assert conn.scalar(text("SELECT to_regclass('event_bodies')")) is None
                engine.dispose()
                upgrade(url, "head")
                today = day_of(utcnow())
                with engine.connect() as conn:
                    made = [d.day for d in days(conn)]
                assert made == [today + timedelta(days=n) for n in range(AHEAD_DAYS + 1)]
                assert deliver(engine, "msg_up_again", b'{"again": true}') is True
                assert partition_body(engine, Day(today), "msg_up_again") == b'{"again": true}'
                assert stored_event(engine, "msg_down").body == b'{"kept": true}'
            finally:
                engine.dispose()
