"""Retention and erasure (shared/lifecycle.py) against real PostgreSQL."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, func, select, text, update
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from cli.samples import sample_event
from shared import lifecycle
from shared.catalog import KIND_OF, queue_for
from shared.db import make_sessionmaker, transaction, utcnow
from shared.lifecycle import (
    ERASED_TEXT,
    PURGED_BYTES,
    PURGED_EVENTS,
    backfill_subjects,
    erase_customer,
    erase_json,
    find_scope,
    lifecycle_totals,
    personal_strings,
    purge,
)
from shared.models import (
    Change,
    CreditEntry,
    CustomerErasure,
    DeliveryStatus,
    EventStatus,
    OutboundAttempt,
    OutboundDelivery,
    Payment,
    Subscription,
    WebhookEvent,
)
from tests.dead_letter_support import store_event
from tests.handlers.events import T0
from tests.lifecycle_support import (
    ALICE,
    BOB,
    Feed,
    age,
    body_for,
    dump,
    every_row,
    every_table_as_text,
    found_in,
    history_of,
    into_rows,
    state_of,
)
from tests.support import stored_event
from workers.claims import Applied, apply_batch, apply_event, claim_batch, claim_event


def backdate(engine: Engine, webhook_ids: list[str], days: float) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(WebhookEvent)
            .where(WebhookEvent.webhook_id.in_(webhook_ids))
            .values(processed_at=utcnow() - timedelta(days=days))
        )


def five_expired_payments(engine: Engine) -> None:
    """Five processed payments whose processing finished 40 days ago, with their bodies in
    their rows (recorded before migration 0008): purged in place at 30."""
    feed = Feed(engine)
    ids = [
        feed.record(body_for("payment.succeeded", ALICE, T0, payment_id=f"p{n}")) for n in range(5)
    ]
    into_rows(engine, ids)
    with engine.begin() as conn:
        conn.execute(update(WebhookEvent).values(status=EventStatus.PROCESSED))
    backdate(engine, ids, days=40)


def expired_sample_mix(engine: Engine, n: int) -> None:
    """`n` processed events, one of each sample type in turn (bodies of 100 B to 2 kB), their
    processing finished 40 days ago, in that order."""
    types = sorted(KIND_OF)
    old = utcnow() - timedelta(days=40)
    rows = [
        {
            "webhook_id": f"msg_mix_{i:05d}",
            "type": types[i % len(types)],
            "status": EventStatus.PROCESSED,
            "attempts": 1,
            "body": json.dumps(sample_event(types[i % len(types)])).encode(),
            "headers": {"webhook-id": f"msg_mix_{i:05d}"},
            "webhook_ts": 1,
            "received_at": old,
            "processed_at": old + timedelta(milliseconds=i),
        }
        for i in range(n)
    ]
    with engine.begin() as conn:
        conn.execute(WebhookEvent.__table__.insert(), rows)


def event(engine: Engine, webhook_id: str) -> WebhookEvent:
    return stored_event(engine, webhook_id)


def age_or_backdate(engine: Engine, kept_in: str, webhook_ids: list[str], days: float) -> None:
    """Events finished `days` ago: with their bodies in their rows (recorded before 0008, the
    purge in place), or received then too, their bodies in that day's partition."""
    if kept_in == "rows":
        into_rows(engine, webhook_ids)
        backdate(engine, webhook_ids, days)
    else:
        age(engine, webhook_ids, days)


class TestEraseJson:
    """The redaction of one JSON value: personal keys blanked, the rest kept."""

    def test_personal_keys_are_blanked_and_ids_amounts_statuses_kept(self) -> None:
        data = {
            "payment_id": "pay_1",
            "total_amount": 2500,
            "status": "succeeded",
            "created_at": "2026-01-01T00:00:00Z",
            "customer": {
                "customer_id": "cus_1",
                "email": "a@b.c",
                "name": "Ann",
                "metadata": {"k": "v"},
            },
            "billing": {"country": "DE", "city": "Berlin", "zipcode": "10115"},
            "card_last_four": "4242",
            "metadata": {"note": "x"},
        }
        erased = erase_json(data)
        assert erased == {
            "payment_id": "pay_1",
            "total_amount": 2500,
            "status": "succeeded",
            "created_at": "2026-01-01T00:00:00Z",
            "customer": {"customer_id": "cus_1", "email": None, "name": None, "metadata": {}},
            "billing": {"country": None, "city": None, "zipcode": None},
            "card_last_four": None,
            "metadata": {},
        }

    def test_personal_strings_are_cut_out_of_free_text_but_never_out_of_kept_fields(self) -> None:
        data = {
            "customer": {"customer_id": "cus_1", "name": "Ann Smith", "email": "ann@x.org"},
            "billing": {"zipcode": "100", "state": "CA"},
            "error_message": "card of ann@x.org (Ann Smith) declined",
            "label": "CA",
            "amount": "100",
            "balance_after": "100",
            "currency": "CAD",
        }
        strings = personal_strings(data)
        assert strings == {"Ann Smith", "ann@x.org", "100", "CA"}
        erased = erase_json(data, strings)
        assert erased["error_message"] == f"card of {ERASED_TEXT} ({ERASED_TEXT}) declined"
        assert erased["label"] == ERASED_TEXT  # a short string only as a whole value
        assert (erased["amount"], erased["balance_after"], erased["currency"]) == (
            "100",
            "100",
            "CAD",
        )

    def test_erasing_twice_gives_the_same_value(self) -> None:
        data = body_for("subscription.active", ALICE, T0)
        once = erase_json(data, personal_strings(data))
        assert erase_json(once, personal_strings(once)) == once
        assert personal_strings(once) == set()


class TestPurge:
    """RETENTION_DAYS: old processed and ignored bodies go, everything else stays."""

    def test_delivered_outbound_deliveries_older_than_retention_go_the_rest_stay(
        self, clean_db: Engine
    ) -> None:
        """DESIGN: delivered outbound changes older than RETENTION_DAYS are removed likewise;
        pending and dead deliveries stay for a retry, and so does the change feed."""
        now = utcnow()
        rows = {
            "old": (DeliveryStatus.DELIVERED, now - timedelta(days=31)),
            "recent": (DeliveryStatus.DELIVERED, now - timedelta(days=29)),
            "dead": (DeliveryStatus.DEAD, None),
            "pending": (DeliveryStatus.PENDING, None),
        }
        ids: dict[str, int] = {}
        with make_sessionmaker(clean_db)() as session, session.begin():
            for name, (status, delivered_at) in rows.items():
                delivery = OutboundDelivery(
                    change_seq=1,
                    change_id=f"chg_{name}",
                    url="http://127.0.0.1:9/hook",
                    kind="payment",
                    entity_id="pay_1",
                    status=status,
                    attempts=1,
                    delivered_at=delivered_at,
                )
                session.add(delivery)
                session.flush()
                ids[name] = delivery.id
                session.add(
                    OutboundAttempt(
                        delivery_id=delivery.id, attempt=1, started_at=now, duration_ms=1.0
                    )
                )
        factory = make_sessionmaker(clean_db)
        dry = purge(factory, retention_days=30, batch_size=500, dry_run=True)
        assert dry.deliveries == 1
        assert purge(factory, retention_days=30, batch_size=500).deliveries == 1
        with factory() as session:
            kept = set(session.scalars(select(OutboundDelivery.id)))
            attempts = set(session.scalars(select(OutboundAttempt.delivery_id)))
        assert kept == attempts == {ids["recent"], ids["dead"], ids["pending"]}

    @pytest.mark.parametrize("kept_in", ["rows", "days"])
    def test_old_processed_and_ignored_bodies_are_purged_recent_ones_and_dead_letters_kept(
        self, clean_db: Engine, kept_in: str
    ) -> None:
        """Bodies in their rows are purged in place; bodies in their day's partition go with
        the day, dropped whole once every event received then finished before the cutoff
        (32 days: a day ends up to 24 h after an event, and LATE after that)."""
        feed = Feed(clean_db)
        old = feed.send(body_for("payment.succeeded", ALICE, T0, payment_id="pay_old"))
        ignored = feed.send(
            {"business_id": "b", "type": "payout.sent", "timestamp": T0.isoformat(), "data": {}}
        )
        recent = feed.send(body_for("payment.succeeded", BOB, T0, payment_id="pay_new"))
        dead = feed.record(body_for("payment.succeeded", BOB, T0, payment_id="pay_dead"))
        with clean_db.begin() as conn:
            conn.execute(
                update(WebhookEvent)
                .where(WebhookEvent.webhook_id == dead)
                .values(status=EventStatus.DEAD, processed_at=utcnow())
            )
        pending = feed.record(body_for("payment.failed", BOB, T0, payment_id="pay_p"))
        age_or_backdate(clean_db, kept_in, [old, ignored, dead], days=32)
        age_or_backdate(clean_db, kept_in, [recent], days=29)
        kept = {w: event(clean_db, w).body for w in (recent, dead, pending)}
        size = sum(len(event(clean_db, w).body or b"") for w in (old, ignored))

        result = purge(make_sessionmaker(clean_db), retention_days=30, batch_size=500)

        assert (result.events, result.complete) == (2, True)
        assert result.bytes > size  # bodies and headers (a day: its partition on disk)
        assert result.days == (0 if kept_in == "rows" else 1)
        for webhook_id in (old, ignored):
            row = event(clean_db, webhook_id)
            assert (row.body, row.headers) == (None, None)
            assert row.purged_at is not None
            assert row.status in (EventStatus.PROCESSED, EventStatus.IGNORED)
        for webhook_id, body in kept.items():
            row = event(clean_db, webhook_id)
            assert row.body == body and row.headers and row.purged_at is None
        with Session(clean_db) as session:
            assert lifecycle_totals(session) == {PURGED_EVENTS: 2, PURGED_BYTES: result.bytes}
            # The read model does not depend on the raw body.
            assert session.get(Payment, "pay_old") is not None
        # Run again: nothing left to do, and the dead letter still has its body.
        again = purge(make_sessionmaker(clean_db), retention_days=30, batch_size=500)
        assert (again.events, again.days) == (0, 0)
        assert event(clean_db, dead).body == kept[dead]

    @pytest.mark.parametrize("kept_in", ["rows", "days"])
    def test_a_dry_run_counts_what_a_run_then_purges_and_a_second_run_purges_nothing(
        self, clean_db: Engine, kept_in: str
    ) -> None:
        feed = Feed(clean_db)
        ids = [
            feed.send(body_for("payment.succeeded", ALICE, T0, payment_id=f"pay_{n}"))
            for n in range(7)
        ]
        age_or_backdate(clean_db, kept_in, ids, days=40)
        factory = make_sessionmaker(clean_db)

        dry = purge(factory, retention_days=30, batch_size=3, dry_run=True)
        assert all(event(clean_db, w).body for w in ids)
        real = purge(factory, retention_days=30, batch_size=3)
        again = purge(factory, retention_days=30, batch_size=3)

        assert (dry.events, dry.bytes, dry.days) == (real.events, real.bytes, real.days)
        assert (real.events, real.bytes > 0) == (7, True)
        # In place, three batches of 3 (the last finds 1); by day, the day at once.
        assert (real.batches, real.days) == ((3, 0) if kept_in == "rows" else (1, 1))
        assert (again.events, again.bytes, again.days) == (0, 0, 0)
        with Session(clean_db) as session:
            assert lifecycle_totals(session)[PURGED_EVENTS] == 7

    def test_two_purges_at_once_share_the_work_and_count_each_row_once(
        self, clean_db: Engine
    ) -> None:
        """Beat's run and an operator's `purge` side by side: they take turns batch by batch
        (the batch lock), neither counts a row twice."""
        template = body_for("payment.succeeded", ALICE, T0)
        rows = [
            {
                "webhook_id": f"msg_bulk_{n}",
                "type": "payment.succeeded",
                "status": EventStatus.PROCESSED,
                "attempts": 1,
                "body": json.dumps(template).encode(),
                "headers": {"webhook-id": f"msg_bulk_{n}"},
                "webhook_ts": 1,
                "received_at": utcnow(),
                "processed_at": utcnow() - timedelta(days=40, seconds=n),
            }
            for n in range(3000)
        ]
        with clean_db.begin() as conn:
            conn.execute(WebhookEvent.__table__.insert(), rows)
        factory = make_sessionmaker(clean_db)
        results: list[Any] = []
        start = threading.Barrier(2)

        def run() -> None:
            start.wait()
            results.append(purge(factory, retention_days=30, batch_size=50, pause_seconds=0.01))

        threads = [threading.Thread(target=run) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        leftover = purge(factory, retention_days=30, batch_size=50)
        assert sum(r.events for r in results) + leftover.events == 3000
        assert all(r.events > 0 for r in results), "one purge did all the work"
        with Session(clean_db) as session:
            assert lifecycle_totals(session)[PURGED_EVENTS] == 3000
            left = session.scalar(
                select(func.count()).select_from(WebhookEvent).where(WebhookEvent.body.is_not(None))
            )
            assert left == 0

    def test_events_with_their_bodies_in_partitions_never_enter_the_index_the_purge_walks(
        self, clean_db: Engine
    ) -> None:
        """The purge in place walks `ix_webhook_events_body_in_row`: the ingest's events,
        processed, are not in it (it stays one page), where bodies in rows fill it."""
        feed = Feed(clean_db)
        ids = [
            feed.record(body_for("payment.succeeded", ALICE, T0, payment_id=f"pay_{n}"))
            for n in range(1500)
        ]
        with clean_db.begin() as conn:
            conn.execute(
                update(WebhookEvent).values(status=EventStatus.PROCESSED, processed_at=utcnow())
            )

        def pages() -> int:
            with clean_db.connect() as conn:
                size = conn.scalar(text("SELECT pg_relation_size('ix_webhook_events_body_in_row')"))
            return int(size or 0) // 8192

        assert pages() <= 2  # the metapage, and at most an empty root
        into_rows(clean_db, ids)  # the same events, as recorded before migration 0008
        assert pages() > 2

    def test_a_run_starts_at_the_mark_and_reads_no_purged_row_again(self, clean_db: Engine) -> None:
        """Purged rows stay in the index the purge walks; the mark (the last purged row's
        `processed_at`) keeps the next run, its dry run and the oldest-body metric off them.
        Without the mark the same query reads them all: the measure can tell."""
        expired_sample_mix(clean_db, 2000)
        factory = make_sessionmaker(clean_db)
        done = purge(factory, retention_days=30, batch_size=500)
        assert done.events == 2000
        with Session(clean_db) as session:
            last = session.scalar(select(func.max(WebhookEvent.processed_at)))
            assert lifecycle.purge_mark(session) == last
        kept = "msg_kept_body"
        store_event(clean_db, kept, "payment.succeeded", status=EventStatus.PROCESSED)
        backdate(clean_db, [kept], days=1)

        def reads() -> tuple[Any, int]:
            """The oldest body kept, and the pages the purge's walk from the mark touches
            (index and heap: the purged rows' old versions are still in the index)."""
            with Session(clean_db) as session:
                oldest = lifecycle.oldest_body_kept(session)
                walk = select(func.min(WebhookEvent.processed_at)).where(
                    *lifecycle._held(lifecycle.purge_mark(session))
                )
                compiled = walk.compile(
                    session.get_bind(), compile_kwargs={"render_postcompile": True}
                )
                plan = session.connection().exec_driver_sql(
                    f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {compiled}", compiled.params
                )
                top = plan.scalar_one()[0]["Plan"]
            return oldest, int(top["Shared Hit Blocks"]) + int(top["Shared Read Blocks"])

        oldest, fetched = reads()
        assert oldest == event(clean_db, kept).processed_at
        assert fetched <= 5, fetched
        assert purge(factory, retention_days=30, batch_size=500, dry_run=True).events == 0
        with clean_db.begin() as conn:
            conn.execute(
                text("DELETE FROM lifecycle_counters WHERE name = :n"), {"n": lifecycle.PURGE_MARK}
            )
        oldest, fetched = reads()
        assert oldest == event(clean_db, kept).processed_at
        assert fetched >= 100, fetched  # 2,000 rows' pages

    def test_a_purge_waits_for_a_row_an_erasure_holds_then_purges_it(
        self, clean_db: Engine
    ) -> None:
        """The purge no longer skips locked rows (a skipped row would fall behind the mark):
        it waits for the holder's commit, then purges the row with the others."""
        five_expired_payments(clean_db)
        held = feed_ids(clean_db)[2]
        other = create_engine(clean_db.url, poolclass=NullPool)
        factory = make_sessionmaker(clean_db)
        results: list[Any] = []
        with Session(other) as holder:
            holder.execute(
                select(WebhookEvent.webhook_id)
                .where(WebhookEvent.webhook_id == held)
                .with_for_update()
            ).one()
            purger = threading.Thread(
                target=lambda: results.append(purge(factory, retention_days=30, batch_size=500))
            )
            purger.start()
            purger.join(timeout=1.0)
            assert purger.is_alive(), "the purge did not wait for the held row"
            holder.commit()
        purger.join(timeout=30)
        other.dispose()
        assert [r.events for r in results] == [5]
        assert event(clean_db, held).body is None

    def test_retention_zero_keeps_everything(self, clean_db: Engine) -> None:
        feed = Feed(clean_db)
        webhook_id = feed.send(body_for("payment.succeeded", ALICE, T0))
        backdate(clean_db, [webhook_id], days=3650)
        result = purge(make_sessionmaker(clean_db), retention_days=0, batch_size=500)
        assert (result.cutoff, result.events) == (None, 0)
        assert event(clean_db, webhook_id).body

    def test_a_run_stops_at_its_time_budget_and_says_it_is_not_complete(
        self, clean_db: Engine
    ) -> None:
        five_expired_payments(clean_db)
        result = purge(make_sessionmaker(clean_db), retention_days=30, batch_size=2, run_seconds=0)
        assert (result.events, result.complete) == (2, False)

    @pytest.mark.parametrize(("batch_seconds", "pause"), [(0.01, 0.1), (0.3, 0.6)])
    def test_the_pause_after_a_batch_grows_with_the_batchs_own_time(
        self, clean_db: Engine, monkeypatch: pytest.MonkeyPatch, batch_seconds: float, pause: float
    ) -> None:
        """On a busy host a batch takes longer; the purge then backs off with it."""
        five_expired_payments(clean_db)
        clock, pauses = [0.0], []
        real_batch = lifecycle.purge_batch

        def timed_batch(*args: Any, **kwargs: Any) -> Any:
            clock[0] += batch_seconds
            return real_batch(*args, **kwargs)

        monkeypatch.setattr(lifecycle, "purge_batch", timed_batch)
        monkeypatch.setattr(
            lifecycle, "time", SimpleNamespace(monotonic=lambda: clock[0], sleep=pauses.append)
        )
        result = purge(
            make_sessionmaker(clean_db), retention_days=30, batch_size=2, pause_seconds=0.1
        )
        assert result.events == 5
        assert pauses == pytest.approx([pause, pause])


def feed_ids(engine: Engine) -> list[str]:
    with Session(engine) as session:
        return list(session.scalars(select(WebhookEvent.webhook_id)))


def forget_subjects(engine: Engine, webhook_ids: list[str]) -> None:
    """As if recorded before migration 0006: neither `customer_id` nor `payment_id`."""
    with engine.begin() as conn:
        conn.execute(
            update(WebhookEvent)
            .where(WebhookEvent.webhook_id.in_(webhook_ids))
            .values(customer_id=None, payment_id=None)
        )


def erase(engine: Engine, customer_id: str, **kwargs: Any) -> Any:
    return erase_customer(make_sessionmaker(engine), customer_id, requested_by="test", **kwargs)


class TestErasure:
    """erase-customer: none of the customer's personal data left anywhere, nothing else changed."""

    def test_a_dump_holds_none_of_the_customers_data_and_the_other_customer_is_untouched(
        self, clean_db: Engine, pg_url: str
    ) -> None:
        feed = Feed(clean_db)
        history_of(feed, ALICE)
        history_of(feed, BOB)
        before = {p.customer_id: state_of(clean_db, p) for p in (ALICE, BOB)}
        bobs = [row for row in every_row(clean_db) if BOB.customer_id in row]
        dumped = dump(pg_url)
        assert all(found_in(dumped, s) for s in ALICE.secrets.values())  # the test can fail

        result = erase(clean_db, ALICE.customer_id)

        dumped, rows = dump(pg_url), every_table_as_text(clean_db)
        for what, secret in ALICE.secrets.items():
            assert not found_in(dumped, secret), what
            assert secret not in rows, what
        for what, secret in BOB.secrets.items():
            assert found_in(dumped, secret), what
        assert [row for row in every_row(clean_db) if BOB.customer_id in row] == bobs
        assert {p.customer_id: state_of(clean_db, p) for p in (ALICE, BOB)} == before
        counts = result.counts_json()
        # The license key and the low-balance alert carry ids and amounts only.
        assert counts["webhook_events"] == {"rows": 13, "changed": 11}
        assert counts["payments"]["changed"] == counts["subscriptions"]["changed"] == 1
        assert counts["refunds"]["changed"] == counts["disputes"]["changed"] == 1
        assert counts["credit_entries"] == {"rows": 3, "changed": 3}

    def test_ids_amounts_and_statuses_stay_in_the_body_and_the_record(
        self, clean_db: Engine
    ) -> None:
        feed = Feed(clean_db)
        webhook_id = feed.send(body_for("payment.succeeded", ALICE, T0, payment_id="pay_a"))
        original = json.loads(event(clean_db, webhook_id).body or b"")

        erase(clean_db, ALICE.customer_id)

        row = event(clean_db, webhook_id)
        body = json.loads(row.body or b"")
        assert row.erased_at is not None
        assert "webhook-signature" not in (row.headers or {})
        for key in ("payment_id", "total_amount", "currency", "status", "created_at"):
            assert body["data"][key] == original["data"][key]
        assert body["type"] == original["type"] and body["timestamp"] == original["timestamp"]
        assert body["data"]["customer"] == {
            "customer_id": ALICE.customer_id,
            "email": None,
            "name": None,
            "phone_number": None,
            "metadata": {},
        }
        with Session(clean_db) as session:
            payment = session.get(Payment, "pay_a")
            assert payment is not None
            assert payment.representation()["customer"]["email"] is None
            assert payment.representation()["customer_id"] == ALICE.customer_id

    def test_a_second_run_changes_nothing_and_both_runs_are_recorded_without_the_data(
        self, clean_db: Engine, pg_url: str
    ) -> None:
        feed = Feed(clean_db)
        history_of(feed, ALICE)
        erase(clean_db, ALICE.customer_id)
        first = every_table_as_text(clean_db)

        again = erase(clean_db, ALICE.customer_id)

        assert all(c["changed"] == 0 for c in again.counts_json().values())
        with Session(clean_db) as session:
            runs = session.scalars(select(CustomerErasure).order_by(CustomerErasure.id)).all()
            assert [r.customer_id for r in runs] == [ALICE.customer_id] * 2
            assert runs[0].counts["webhook_events"]["changed"] == 11
            assert all(r.finished_at and r.requested_by == "test" for r in runs)
        logged = json.dumps([r.summary() for r in runs])
        assert not any(s in logged for s in ALICE.secrets.values())
        # Only the erasure log grew.
        assert every_table_as_text(clean_db).count(ALICE.name) == first.count(ALICE.name) == 0

    def test_a_dry_run_counts_and_changes_nothing(self, clean_db: Engine) -> None:
        feed = Feed(clean_db)
        history_of(feed, ALICE)
        before = every_table_as_text(clean_db)
        result = erase(clean_db, ALICE.customer_id, dry_run=True)
        assert result.counts_json()["webhook_events"] == {"rows": 13, "changed": 11}
        assert result.erasure_id is None
        assert every_table_as_text(clean_db) == before

    def test_an_event_arriving_after_the_erasure_is_applied_then_erased_in_the_same_transaction(
        self, clean_db: Engine, pg_url: str
    ) -> None:
        feed = Feed(clean_db)
        history_of(feed, ALICE)
        erase(clean_db, ALICE.customer_id)
        sub = f"sub_{ALICE.customer_id}"

        late = [
            feed.send(
                body_for(
                    "subscription.cancelled", ALICE, T0 + timedelta(hours=1), subscription_id=sub
                )
            ),
            feed.send(
                body_for(
                    "credit.deducted",
                    ALICE,
                    T0 + timedelta(hours=1),
                    id="cle_late",
                    credit_entitlement_id="cde_main",
                    amount="5.00",
                    balance_before="30.00",
                    balance_after="25.00",
                    description=f"usage by {ALICE.email}",
                )
            ),
            # A dispute names no customer: found through its payment.
            feed.send(
                body_for(
                    "dispute.lost",
                    ALICE,
                    T0 + timedelta(hours=1),
                    payment_id=f"pay_{ALICE.customer_id}",
                    dispute_id="dis_late",
                )
            ),
            # An event type nobody handles is ignored, and erased all the same.
            feed.send(
                {
                    "business_id": "b",
                    "type": "abandoned_checkout.detected",
                    "timestamp": T0.isoformat(),
                    "data": {"customer": ALICE.customer(), "billing": ALICE.billing()},
                }
            ),
        ]

        with Session(clean_db) as session:
            assert [session.get(WebhookEvent, w).status for w in late] == [  # type: ignore[union-attr]
                "processed",
                "processed",
                "processed",
                "ignored",
            ]
            subscription = session.get(Subscription, sub)
            assert subscription is not None and subscription.status == "cancelled"
            entry = session.get(CreditEntry, "cle_late")
            assert entry is not None and entry.balance_after == 25
        dumped = dump(pg_url)
        for what, secret in ALICE.secrets.items():
            assert not found_in(dumped, secret), what

    def test_an_erased_customers_events_applied_in_one_batch_leave_nothing_in_the_feed(
        self, clean_db: Engine, pg_url: str
    ) -> None:
        """A drain's batch writes its changes at its end: those of an erased customer's
        events are erased before they are written, the other customer's kept."""
        feed = Feed(clean_db)
        erase(clean_db, ALICE.customer_id)
        for n, person in enumerate((ALICE, BOB, ALICE)):
            feed.record(body_for("payment.succeeded", person, T0, payment_id=f"pay_batch{n}"))
        factory = make_sessionmaker(clean_db)
        claims = claim_batch(factory, queue_for("payment.succeeded"), 10, 60)
        assert len(claims) == 3
        with transaction(factory) as session:
            results = apply_batch(session, claims, isolate=False)
        assert all(isinstance(r, Applied) for r in results)
        with Session(clean_db) as session:
            changes = session.scalars(select(Change)).all()
        assert {c.entity_id for c in changes} == {"pay_batch0", "pay_batch1", "pay_batch2"}
        dumped = dump(pg_url)
        for what, secret in ALICE.secrets.items():
            assert not found_in(dumped, secret), what
        assert found_in(dumped, BOB.secrets["email"])

    def test_an_unknown_customer_is_recorded_so_that_their_first_events_are_erased(
        self, clean_db: Engine
    ) -> None:
        result = erase(clean_db, ALICE.customer_id)
        assert not result.found and result.erasure_id is not None
        feed = Feed(clean_db)
        webhook_id = feed.send(body_for("payment.succeeded", ALICE, T0))
        assert ALICE.email.encode() not in (event(clean_db, webhook_id).body or b"")

    def test_an_erasure_waits_for_a_worker_applying_that_customers_event_then_erases_it(
        self, clean_db: Engine, pg_url: str
    ) -> None:
        """The worker's transaction has applied the event but not committed when the erasure
        starts: the erasure waits for it, then finds and erases what it wrote."""
        feed = Feed(clean_db)
        webhook_id = feed.record(body_for("payment.succeeded", ALICE, T0, payment_id="pay_a"))
        claim = claim_event(feed.factory, webhook_id, 300, None)
        assert claim is not None
        results: list[Any] = []
        with feed.factory() as worker, worker.begin():
            apply_event(worker, claim)
            eraser = threading.Thread(
                target=lambda: results.append(erase(clean_db, ALICE.customer_id))
            )
            eraser.start()
            eraser.join(timeout=1.0)
            assert eraser.is_alive(), "the erasure did not wait for the worker"
        eraser.join(timeout=30)
        assert results and results[0].counts_json()["payments"] == {"rows": 1, "changed": 1}
        dumped = dump(pg_url)
        for what, secret in ALICE.secrets.items():
            assert not found_in(dumped, secret), what

    @pytest.mark.parametrize("recorded_before", ["every", "every_other"])
    def test_events_recorded_before_the_subject_columns_are_still_found_and_erased(
        self, clean_db: Engine, recorded_before: str
    ) -> None:
        """Rows from before migration 0006 carry neither `customer_id` nor `payment_id`: the
        erasure scans their bodies, also when the customer's other events are indexed."""
        feed = Feed(clean_db)
        history_of(feed, ALICE)
        history_of(feed, BOB)
        ids = sorted(feed_ids(clean_db))
        legacy = ids if recorded_before == "every" else ids[::2]
        forget_subjects(clean_db, legacy)
        bobs = [row for row in every_row(clean_db) if BOB.customer_id in row]

        result = erase(clean_db, ALICE.customer_id)

        assert result.counts_json()["webhook_events"] == {"rows": 13, "changed": 11}
        rows = every_table_as_text(clean_db)
        for what, secret in ALICE.secrets.items():
            assert secret not in rows, what
        bobs_now = [row for row in every_row(clean_db) if BOB.customer_id in row]
        assert len(bobs_now) == len(bobs) and all(s in rows for s in BOB.secrets.values())

    def test_the_backfill_records_legacy_events_subjects_as_the_ingest_does_and_once(
        self, clean_db: Engine
    ) -> None:
        """Beat's purge task runs it: afterwards the erasure finds them by index."""
        feed = Feed(clean_db)
        history_of(feed, ALICE)
        history_of(feed, BOB)
        # A payout names neither a customer nor a payment.
        feed.send(
            {"business_id": "b", "type": "payout.sent", "timestamp": T0.isoformat(), "data": {}}
        )

        def subjects() -> dict[str, tuple[str | None, str | None]]:
            with Session(clean_db) as session:
                rows = session.execute(
                    select(
                        WebhookEvent.webhook_id, WebhookEvent.customer_id, WebhookEvent.payment_id
                    )
                )
                return {w: (c, p) for w, c, p in rows}

        recorded = subjects()
        neither = [w for w, found in recorded.items() if found == (None, None)]
        assert len(neither) == 1
        # Recorded before migration 0006, so before 0008: the bodies in the rows.
        into_rows(clean_db, list(recorded))
        forget_subjects(clean_db, list(recorded))

        factory = make_sessionmaker(clean_db)
        result = backfill_subjects(factory, batch_size=4)
        assert (result.examined, result.filled, result.complete) == (
            len(recorded),
            len(recorded) - 1,
            True,
        )
        assert subjects() == recorded
        again = backfill_subjects(factory, batch_size=4)
        assert (again.examined, again.filled) == (1, 0)
        assert erase(clean_db, ALICE.customer_id).counts_json()["webhook_events"] == {
            "rows": 13,
            "changed": 11,
        }

    def test_a_legacy_dispute_is_found_through_a_payment_only_an_indexed_event_names(
        self, clean_db: Engine
    ) -> None:
        feed = Feed(clean_db)
        pay = feed.send(body_for("payment.succeeded", ALICE, T0, payment_id="pay_only"))
        dispute = feed.send(
            body_for("dispute.opened", ALICE, T0, payment_id="pay_only", dispute_id="dis_1")
        )
        forget_subjects(clean_db, [dispute])
        with Session(clean_db) as session:
            session.execute(
                update(Payment).where(Payment.payment_id == "pay_only").values(customer_id=None)
            )
            session.commit()
        assert (event(clean_db, pay).customer_id, event(clean_db, dispute).payment_id) == (
            ALICE.customer_id,
            None,
        )

        with Session(clean_db) as session:
            scope = find_scope(session, ALICE.customer_id)

        assert scope.webhook_ids == {pay, dispute}

    @pytest.mark.parametrize("others", ["indexed", "legacy"])
    def test_the_search_reads_no_other_customers_bodies_when_their_events_are_indexed(
        self, clean_db: Engine, others: str
    ) -> None:
        """Counted by PostgreSQL for the search's own transaction (pg_stat_xact_user_tables):
        2,000 events of another customer are not read, unless recorded without the columns,
        when the scan must read them all (the measure can tell the difference)."""
        feed = Feed(clean_db)
        history_of(feed, ALICE)
        template = json.dumps(body_for("payment.succeeded", BOB, T0, payment_id="pay_XID"))
        rows = [
            {
                "webhook_id": f"msg_other_{n}",
                "type": "payment.succeeded",
                "status": EventStatus.PROCESSED,
                "attempts": 1,
                "body": template.replace("XID", str(n)).encode(),
                "headers": {"webhook-id": f"msg_other_{n}"},
                "webhook_ts": 1,
                "received_at": utcnow(),
                "customer_id": BOB.customer_id if others == "indexed" else None,
                "payment_id": f"pay_{n}" if others == "indexed" else None,
            }
            for n in range(2000)
        ]
        with clean_db.begin() as conn:
            conn.execute(WebhookEvent.__table__.insert(), rows)
        with clean_db.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("ANALYZE webhook_events"))

        # A connection of its own: PostgreSQL counts into the transaction's figures what a
        # pooled connection did earlier and has not reported yet.
        fresh = create_engine(clean_db.url, poolclass=NullPool)
        with Session(fresh) as session, session.begin():
            scope = find_scope(session, ALICE.customer_id)
            read = session.execute(
                text(
                    "SELECT seq_scan, seq_tup_read, idx_tup_fetch FROM pg_stat_xact_user_tables"
                    " WHERE relname = 'webhook_events'"
                )
            ).one()
        fresh.dispose()

        assert len(scope.webhook_ids) == 13
        if others == "indexed":
            assert (read.seq_scan, read.seq_tup_read) == (0, 0), read
            assert read.idx_tup_fetch <= 2 * 13, read  # the customer's own, found twice at most
        else:
            assert read.seq_tup_read + read.idx_tup_fetch >= 2000, read

    @pytest.mark.parametrize("customer_id", ["", "   ", "x" * 256])
    def test_a_malformed_customer_id_is_refused(self, clean_db: Engine, customer_id: str) -> None:
        from shared.lifecycle import ErasureError

        with pytest.raises(ErasureError, match="customer id"):
            erase(clean_db, customer_id)
