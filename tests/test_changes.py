"""The change feed (shared/changes.py): written with the read-model write, read back in order."""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from ingest.records import RECORDS, record_view
from shared.changes import Cause, list_changes, record_change
from shared.db import make_sessionmaker, transaction
from shared.models import Change, CreditBalance, SnapshotMixin
from tests.handlers.events import (
    apply,
    apply_body,
    apply_then_fail,
    at,
    delivery_for,
    make_event,
)
from tests.test_credits import ENTITLEMENT, ledger_event, low_event
from workers.handlers import ROUTES

CUSTOMER = "cus_ledger1"


@pytest.fixture
def factory(clean_db: Engine) -> sessionmaker[Session]:
    return make_sessionmaker(clean_db)


def feed(factory: sessionmaker[Session], **filters: Any) -> list[dict[str, Any]]:
    with factory() as session:
        changes, _ = list_changes(session, limit=1000, **filters)
    return changes


def api_view(factory: sessionmaker[Session], family: str, key: str) -> dict[str, Any]:
    """The record as `GET /api/<family>/<id>` returns it, without `last_event` and `history`."""
    model: type[SnapshotMixin] = RECORDS[family][0]
    with factory() as session:
        row = session.get(model, key)
        assert row is not None
        view = record_view(session, row)
    view.pop("last_event")
    view.pop("history", None)
    return view


def credits_view(factory: sessionmaker[Session]) -> dict[str, Any]:
    with factory() as session:
        row = session.get(CreditBalance, (CUSTOMER, ENTITLEMENT))
        assert row is not None
        return row.representation()


class TestSnapshotChanges:
    def test_new_record_writes_one_change_from_null_to_the_api_representation(
        self, factory: sessionmaker[Session]
    ) -> None:
        event, delivery = make_event("payment.succeeded", payment_id="pay_1")
        apply(factory, event, delivery)
        [change] = feed(factory)
        after = api_view(factory, "payments", "pay_1")
        assert change["kind"] == "payment"
        assert change["entity_id"] == "pay_1"
        assert change["before"] is None
        assert change["after"] == after
        assert change["changed"] == sorted(after)
        assert change["customer_id"] == after["customer_id"]
        assert change["cause"] == {
            "webhook_id": delivery.webhook_id,
            "type": "payment.succeeded",
            "timestamp": event.timestamp.isoformat(),
        }
        assert change["id"].startswith("chg_")

    def test_newer_event_writes_a_change_from_the_previous_state(
        self, factory: sessionmaker[Session]
    ) -> None:
        apply(factory, *make_event("payment.processing", when=at(0), payment_id="pay_1"))
        first_after = feed(factory)[0]["after"]
        apply(factory, *make_event("payment.failed", when=at(5), payment_id="pay_1"))
        first, second = feed(factory)
        assert second["seq"] > first["seq"]
        assert second["before"] == first_after
        assert second["after"] == api_view(factory, "payments", "pay_1")
        assert "status" in second["changed"]
        assert set(second["changed"]) <= set(second["after"])

    def test_duplicate_delivery_writes_no_change(self, factory: sessionmaker[Session]) -> None:
        event, delivery = make_event("subscription.active", subscription_id="sub_1")
        apply(factory, event, delivery)
        apply(factory, event, delivery)
        assert len(feed(factory)) == 1

    def test_superseded_event_writes_no_change(self, factory: sessionmaker[Session]) -> None:
        apply(factory, *make_event("subscription.cancelled", when=at(10), subscription_id="s"))
        apply(factory, *make_event("subscription.active", when=at(0), subscription_id="s"))
        [change] = feed(factory)
        assert change["after"]["status"] == "cancelled"

    def test_event_that_changes_nothing_writes_no_change(
        self, factory: sessionmaker[Session]
    ) -> None:
        """The same state delivered again by a later event (another webhook id) is no change."""
        same = {"id": "lic_1", "created_at": at(0).isoformat(), "expires_at": None}
        apply(factory, *make_event("license_key.created", when=at(0), **same))
        apply(factory, *make_event("license_key.created", when=at(5), **same))
        assert len(feed(factory)) == 1

    @pytest.mark.parametrize(
        ("event_type", "family", "kind", "key"),
        [
            ("refund.succeeded", "refunds", "refund", "refund_id"),
            ("dispute.opened", "disputes", "dispute", "dispute_id"),
            ("subscription.renewed", "subscriptions", "subscription", "subscription_id"),
            ("license_key.created", "license-keys", "license_key", "id"),
        ],
    )
    def test_every_snapshot_family_writes_its_kind(
        self, factory: sessionmaker[Session], event_type: str, family: str, kind: str, key: str
    ) -> None:
        apply(factory, *make_event(event_type, **{key: "x_1"}))
        [change] = feed(factory, kind=kind)
        assert change["entity_id"] == "x_1"
        assert change["after"] == api_view(factory, family, "x_1")
        assert "history" not in change["after"]
        assert "last_event" not in change["after"]

    def test_rolled_back_apply_leaves_no_change(self, factory: sessionmaker[Session]) -> None:
        event, delivery = make_event("payment.succeeded", payment_id="pay_1")
        assert apply_then_fail(factory, event, delivery, Change) == [1]
        assert feed(factory) == []

    def test_concurrent_creation_chains_the_second_change_on_the_first(
        self, clean_db: Engine
    ) -> None:
        """Two workers creating one record at once: the second's `before` is the first's `after`."""
        factory = make_sessionmaker(clean_db)
        first_in = threading.Event()
        first = make_event("payment.processing", when=at(0), payment_id="pay_race")
        second = make_event("payment.succeeded", when=at(5), payment_id="pay_race")
        errors: list[BaseException] = []

        def run_second() -> None:
            try:
                first_in.wait(10)
                apply(factory, *second)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run_second)
        thread.start()
        with transaction(factory) as session:
            ROUTES["payment.processing"](session, *first)
            first_in.set()
            time.sleep(0.5)  # the second has read no row and waits on the upsert
        thread.join(20)
        assert not errors
        one, two = feed(factory)
        assert one["before"] is None
        assert two["before"] == one["after"]
        assert two["after"] == api_view(factory, "payments", "pay_race")


class TestCreditBalanceChanges:
    def test_balance_moves_write_a_chain_of_changes(self, factory: sessionmaker[Session]) -> None:
        first = ledger_event(entry_id="e1", before="0", after="100", created_at=at(0))
        second = ledger_event(
            "credit.deducted", entry_id="e2", before="100", after="60", created_at=at(10)
        )
        apply_body(factory, first, delivery_for("w1", at(0)))
        apply_body(factory, second, delivery_for("w2", at(10)))
        one, two = feed(factory, kind="credit_balance")
        assert one["entity_id"] == f"{CUSTOMER}:{ENTITLEMENT}"
        assert one["customer_id"] == CUSTOMER
        assert one["before"] is None
        assert two["before"] == one["after"]
        assert two["after"] == credits_view(factory)
        assert two["after"]["balance"] == "60"

    def test_same_entry_under_another_delivery_writes_no_change(
        self, factory: sessionmaker[Session]
    ) -> None:
        entry = ledger_event(entry_id="e1", before="0", after="100", created_at=at(0))
        apply_body(factory, entry, delivery_for("w1", at(0)))
        apply_body(factory, entry, delivery_for("w1-again", at(0)))
        assert len(feed(factory)) == 1

    def test_gap_and_its_repair_flip_chain_ok_in_the_feed(
        self, factory: sessionmaker[Session]
    ) -> None:
        apply_body(
            factory,
            ledger_event(entry_id="e1", before="0", after="100", created_at=at(0)),
            delivery_for("w1", at(0)),
        )
        apply_body(
            factory,
            ledger_event(entry_id="e3", before="50", after="20", created_at=at(20)),
            delivery_for("w3", at(20)),
        )
        apply_body(
            factory,
            ledger_event(entry_id="e2", before="100", after="50", created_at=at(10)),
            delivery_for("w2", at(10)),
        )
        _, gap, healed = feed(factory)
        assert gap["after"]["chain_ok"] is False and "chain_ok" in gap["changed"]
        assert healed["after"]["chain_ok"] is True and "chain_ok" in healed["changed"]
        assert healed["after"] == credits_view(factory)

    def test_new_low_balance_alert_is_a_change_and_an_older_one_is_not(
        self, factory: sessionmaker[Session]
    ) -> None:
        apply_body(factory, low_event("5.00", at=at(10)), delivery_for("a2", at(10)))
        apply_body(factory, low_event("9.00", at=at(0)), delivery_for("a1", at(0)))
        [change] = feed(factory)
        assert change["after"]["low_balance_alert"]["available_balance"] == "5.00"
        assert change["changed"] == sorted(change["after"])


def write_change(factory: sessionmaker[Session], entity: str, webhook_id: str) -> None:
    with transaction(factory) as session:
        record_change(
            session,
            kind="payment",
            entity_id=entity,
            customer_id=None,
            before=None,
            after={"payment_id": entity, "n": webhook_id},
            cause=Cause(webhook_id, "payment.succeeded", datetime(2026, 1, 1, tzinfo=UTC)),
        )


class TestListChanges:
    def test_pages_with_next_after_and_an_empty_page_keeps_the_cursor(
        self, factory: sessionmaker[Session]
    ) -> None:
        for n in range(5):
            write_change(factory, f"pay_{n}", f"w{n}")
        with factory() as session:
            page, cursor = list_changes(session, after=0, limit=2)
            assert [c["entity_id"] for c in page] == ["pay_0", "pay_1"]
            page, cursor = list_changes(session, after=cursor, limit=10)
            assert [c["entity_id"] for c in page] == ["pay_2", "pay_3", "pay_4"]
            page, again = list_changes(session, after=cursor)
            assert page == [] and again == cursor

    def test_filters_by_kind_and_entity(self, factory: sessionmaker[Session]) -> None:
        write_change(factory, "pay_a", "w1")
        write_change(factory, "pay_b", "w2")
        assert [c["entity_id"] for c in feed(factory, entity_id="pay_b")] == ["pay_b"]
        assert feed(factory, kind="refund") == []


class TestLateCommit:
    """A transaction that took its seq first but commits last is never skipped by a reader."""

    def test_a_reader_never_skips_a_change_that_commits_late(self, clean_db: Engine) -> None:
        factory = make_sessionmaker(clean_db)
        # T1 takes a seq and stays open.
        t1 = factory()
        t1.begin()
        write_t1 = record_change(
            t1,
            kind="payment",
            entity_id="pay_late",
            customer_id=None,
            before=None,
            after={"payment_id": "pay_late"},
            cause=Cause("w_late", "payment.succeeded", datetime(2026, 1, 1, tzinfo=UTC)),
        )
        assert write_t1 is not None
        # T2 writes another change and tries to commit meanwhile.
        t2_done = threading.Event()
        thread = threading.Thread(
            target=lambda: (write_change(factory, "pay_early", "w_early"), t2_done.set())
        )
        thread.start()
        time.sleep(0.5)
        with factory() as session:
            page, cursor = list_changes(session, after=0)
        # T2 waits for T1 to commit, and the reader sees nothing that would page past T1.
        assert not t2_done.is_set()
        assert page == [] and cursor == 0
        t1.commit()
        t1.close()
        assert t2_done.wait(10)
        thread.join()
        with factory() as session:
            rest, _ = list_changes(session, after=cursor)
        seen = [c["entity_id"] for c in page + rest]
        assert seen == ["pay_late", "pay_early"]

    def test_concurrent_writers_with_random_commit_delays_are_all_seen_once(
        self, clean_db: Engine
    ) -> None:
        """Eight writers hold their transaction open a random while; a reader pages all along."""
        factory = make_sessionmaker(clean_db)
        written: list[str] = []
        lock = threading.Lock()

        def writer(n: int) -> None:
            rng = random.Random(n)
            for i in range(15):
                with transaction(factory) as session:
                    record_change(
                        session,
                        kind="payment",
                        entity_id=f"pay_{n}_{i}",
                        customer_id=None,
                        before=None,
                        after={"i": i},
                        cause=Cause(f"w{n}_{i}", "payment.succeeded", datetime.now(UTC)),
                    )
                    time.sleep(rng.uniform(0, 0.01))
                with lock:
                    written.append(f"pay_{n}_{i}")

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        seen: list[str] = []
        cursor = 0
        while any(t.is_alive() for t in threads) or len(seen) < len(written):
            with factory() as session:
                page, cursor = list_changes(session, after=cursor, limit=7)
            seen += [c["entity_id"] for c in page]
            if not page:
                time.sleep(0.005)
        assert sorted(seen) == sorted(written)
        assert len(seen) == len(set(seen)) == 120
        with factory() as session:
            seqs = session.scalars(select(Change.seq).order_by(Change.seq)).all()
        assert len(seqs) == 120
