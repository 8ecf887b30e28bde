"""The credit ledger handlers and their API, against a real PostgreSQL."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from cli.samples import sample_event
from ingest import create_app
from shared.db import make_engine, make_sessionmaker, transaction
from shared.ledger import ChainLink, order_chain
from shared.models import Base, CreditBalance, CreditEntry, Outcome, Payment
from shared.settings import Settings
from tests.support import ADMIN_TOKEN
from workers.handlers import ROUTES, Delivery
from workers.handlers.credits import recompute_balance
from workers.schemas import EventValidationError, parse_event

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
CUSTOMER = "cus_ledger1"
ENTITLEMENT = "cde_api_calls"


def ledger_event(
    event_type: str = "credit.added",
    *,
    entry_id: str,
    before: str,
    after: str,
    created_at: datetime,
    overage_before: str = "0.00",
    overage_after: str = "0.00",
    customer_id: str = CUSTOMER,
    entitlement_id: str = ENTITLEMENT,
) -> dict[str, Any]:
    amount = abs(Decimal(after) - Decimal(before)) or abs(
        Decimal(overage_after) - Decimal(overage_before)
    )
    return sample_event(
        event_type,
        timestamp=created_at,
        overrides={
            "data.id": entry_id,
            "data.customer_id": customer_id,
            "data.credit_entitlement_id": entitlement_id,
            "data.amount": str(amount),
            "data.balance_before": before,
            "data.balance_after": after,
            "data.overage_before": overage_before,
            "data.overage_after": overage_after,
            "data.created_at": created_at.isoformat(),
        },
    )


def low_event(available: str, *, at: datetime, percent: int = 10) -> dict[str, Any]:
    return sample_event(
        "credit.balance_low",
        timestamp=at,
        overrides={
            "data.customer_id": CUSTOMER,
            "data.credit_entitlement_id": ENTITLEMENT,
            "data.available_balance": available,
            "data.threshold_amount": "20.00",
            "data.threshold_percent": percent,
        },
    )


def deliver(
    factory: sessionmaker[Session],
    body: dict[str, Any],
    *,
    webhook_id: str,
    webhook_ts: int = 1_767_000_000,
) -> Outcome:
    """Validate and apply one delivery in its own transaction, as the worker does."""
    event_type = body["type"]
    event = parse_event(event_type, json.dumps(body).encode())
    assert event is not None
    delivery = Delivery(webhook_id, webhook_ts, datetime.fromisoformat(body["timestamp"]))
    with transaction(factory) as session:
        return ROUTES[event_type](session, event, delivery)


def account(factory: sessionmaker[Session]) -> CreditBalance:
    with factory() as session:
        return session.execute(select(CreditBalance)).scalar_one()


def entry_count(factory: sessionmaker[Session]) -> int:
    with factory() as session:
        return int(session.scalar(select(func.count()).select_from(CreditEntry)) or 0)


CHAIN = [
    ledger_event("credit.added", entry_id="cle_1", before="0", after="100.00", created_at=T0),
    ledger_event(
        "credit.deducted",
        entry_id="cle_2",
        before="100.00",
        after="60.50",
        created_at=T0 + timedelta(minutes=1),
    ),
    ledger_event(
        "credit.overage_charged",
        entry_id="cle_3",
        before="60.50",
        after="0.00",
        overage_before="0.00",
        overage_after="12.25",
        created_at=T0 + timedelta(minutes=2),
    ),
    ledger_event(
        "credit.manual_adjustment",
        entry_id="cle_4",
        before="0.00",
        after="30.00",
        overage_before="12.25",
        overage_after="12.25",
        created_at=T0 + timedelta(minutes=3),
    ),
]


@pytest.fixture
def factory(clean_db: Engine) -> sessionmaker[Session]:
    return make_sessionmaker(clean_db)


class TestApplyCreditEntry:
    def test_chain_in_order_gives_the_newest_balance_and_overage(
        self, factory: sessionmaker[Session]
    ) -> None:
        outcomes = [deliver(factory, e, webhook_id=f"msg_{i}") for i, e in enumerate(CHAIN)]
        assert outcomes == [Outcome.APPLIED] * 4
        held = account(factory)
        assert (held.balance, held.overage) == (Decimal("30.00"), Decimal("12.25"))
        assert str(held.balance) == "30.00"
        assert held.chain_ok is True
        assert held.entry_count == 4
        assert held.last_entry_id == "cle_4"
        assert held.last_entry_at == T0 + timedelta(minutes=3)

    def test_same_delivery_twice_is_superseded_and_changes_nothing(
        self, factory: sessionmaker[Session]
    ) -> None:
        assert deliver(factory, CHAIN[0], webhook_id="msg_a") == Outcome.APPLIED
        assert deliver(factory, CHAIN[0], webhook_id="msg_a") == Outcome.SUPERSEDED
        assert entry_count(factory) == 1
        assert account(factory).balance == Decimal("100.00")

    def test_same_entry_under_two_delivery_ids_counts_once(
        self, factory: sessionmaker[Session]
    ) -> None:
        for i, event in enumerate(CHAIN[:2]):
            deliver(factory, event, webhook_id=f"msg_{i}")
        assert deliver(factory, CHAIN[1], webhook_id="msg_resent") == Outcome.SUPERSEDED
        held = account(factory)
        assert (held.entry_count, held.balance, held.chain_ok) == (2, Decimal("60.50"), True)
        with factory() as session:
            assert session.get(CreditEntry, "cle_2").webhook_id == "msg_1"  # type: ignore[union-attr]

    def test_out_of_order_arrival_gives_the_same_final_balance(
        self, factory: sessionmaker[Session]
    ) -> None:
        for i in (3, 1, 0, 2):
            deliver(factory, CHAIN[i], webhook_id=f"msg_{i}")
        held = account(factory)
        assert (held.balance, held.overage, held.chain_ok) == (
            Decimal("30.00"),
            Decimal("12.25"),
            True,
        )
        assert held.last_entry_id == "cle_4"

    def test_gap_is_flagged_then_healed_when_the_missing_entry_arrives(
        self, factory: sessionmaker[Session]
    ) -> None:
        for i in (0, 1, 3):
            deliver(factory, CHAIN[i], webhook_id=f"msg_{i}")
        held = account(factory)
        assert held.chain_ok is False
        assert held.balance == Decimal("30.00")  # the newest entry held, gap or not
        deliver(factory, CHAIN[2], webhook_id="msg_2")
        assert account(factory).chain_ok is True

    def test_entries_appended_in_order_agree_with_a_full_recompute(
        self, factory: sessionmaker[Session]
    ) -> None:
        """Newer entries take the short path; it must land where reading the ledger lands."""
        for i in (0, 1, 3):
            deliver(factory, CHAIN[i], webhook_id=f"msg_{i}")
        appended = account(factory)
        with transaction(factory) as session:
            recomputed = recompute_balance(
                session, appended.customer_id, appended.credit_entitlement_id
            )
        fields = ("balance", "overage", "chain_ok", "last_entry_at", "last_entry_id", "entry_count")
        assert [getattr(appended, f) for f in fields] == [recomputed[f] for f in fields]
        assert appended.chain_ok is False

    def test_oldest_entry_held_need_not_start_at_zero(self, factory: sessionmaker[Session]) -> None:
        for i in (2, 3):
            deliver(factory, CHAIN[i], webhook_id=f"msg_{i}")
        held = account(factory)
        assert (held.chain_ok, held.balance, held.entry_count) == (True, Decimal("30.00"), 2)

    def test_entries_sharing_created_at_are_ordered_by_the_chain(
        self, factory: sessionmaker[Session]
    ) -> None:
        """Ids sort against the chain here: the tie must follow the balances, not the ids."""
        tied = [
            ledger_event(entry_id="cle_z", before="0", after="10", created_at=T0),
            ledger_event(
                "credit.deducted", entry_id="cle_y", before="10", after="7", created_at=T0
            ),
            ledger_event("credit.deducted", entry_id="cle_x", before="7", after="5", created_at=T0),
        ]
        for i, event in enumerate(reversed(tied)):
            deliver(factory, event, webhook_id=f"msg_{i}")
        held = account(factory)
        assert (held.balance, held.chain_ok, held.last_entry_id) == (Decimal("5"), True, "cle_x")

    def test_accounts_are_kept_apart(self, factory: sessionmaker[Session]) -> None:
        deliver(factory, CHAIN[0], webhook_id="msg_0")
        other = ledger_event(
            entry_id="cle_other", before="5", after="9", created_at=T0, entitlement_id="cde_2"
        )
        deliver(factory, other, webhook_id="msg_other")
        with factory() as session:
            balances = {
                b.credit_entitlement_id: b.balance
                for b in session.execute(select(CreditBalance)).scalars()
            }
        assert balances == {ENTITLEMENT: Decimal("100.00"), "cde_2": Decimal("9")}

    def test_invalid_payload_fails_validation_and_writes_nothing(
        self, factory: sessionmaker[Session]
    ) -> None:
        bad = dict(CHAIN[0], data={**CHAIN[0]["data"], "balance_after": "a lot"})
        with pytest.raises(EventValidationError, match="balance_after"):
            deliver(factory, bad, webhook_id="msg_bad")
        assert entry_count(factory) == 0
        with factory() as session:
            assert session.scalar(select(func.count()).select_from(CreditBalance)) == 0

    def test_failure_later_in_the_transaction_leaves_nothing_behind(
        self, factory: sessionmaker[Session]
    ) -> None:
        """The handler never commits: if marking the event final fails, its writes go too."""
        event = parse_event("credit.added", json.dumps(CHAIN[0]).encode())
        with pytest.raises(RuntimeError), transaction(factory) as session:
            ROUTES["credit.added"](session, event, Delivery("msg_0", 1, T0))
            raise RuntimeError("the event row could not be updated")
        with factory() as session:
            assert session.scalar(select(func.count()).select_from(CreditBalance)) == 0
        assert entry_count(factory) == 0


class TestConcurrentEntries:
    def test_entries_applied_at_the_same_moment_by_separate_workers_are_all_kept(
        self, factory: sessionmaker[Session]
    ) -> None:
        """Eight transactions start together on one new account; none may lose another's entry."""
        workers = 8
        events = [
            ledger_event(
                entry_id=f"cle_c{i}",
                before=str(i * 10),
                after=str((i + 1) * 10),
                created_at=T0 + timedelta(seconds=i),
            )
            for i in range(workers)
        ]
        barrier = threading.Barrier(workers)
        errors: list[BaseException] = []

        def work(i: int) -> None:
            try:
                event = parse_event(events[i]["type"], json.dumps(events[i]).encode())
                delivery = Delivery(f"msg_c{i}", 1, T0)
                with transaction(factory) as session:
                    # Every transaction is open before any of them writes.
                    session.execute(select(1))
                    barrier.wait(timeout=30)
                    ROUTES["credit.added"](session, event, delivery)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == []
        held = account(factory)
        assert (held.entry_count, held.chain_ok) == (workers, True)
        assert held.balance == Decimal(workers * 10)
        assert entry_count(factory) == workers


class TestBalanceLow:
    def test_most_recent_alert_is_kept_and_an_older_one_arriving_late_is_superseded(
        self, factory: sessionmaker[Session]
    ) -> None:
        newer, older = low_event("8.00", at=T0 + timedelta(hours=1)), low_event("15.00", at=T0)
        assert deliver(factory, newer, webhook_id="msg_new") == Outcome.APPLIED
        assert deliver(factory, older, webhook_id="msg_old") == Outcome.SUPERSEDED
        held = account(factory)
        assert (held.alert_available_balance, held.alert_at) == (
            Decimal("8.00"),
            T0 + timedelta(hours=1),
        )
        assert held.balance is None  # an alert alone does not make a ledger

    def test_equal_timestamps_are_ordered_by_webhook_timestamp_then_webhook_id(
        self, factory: sessionmaker[Session]
    ) -> None:
        deliver(factory, low_event("1.00", at=T0), webhook_id="msg_b", webhook_ts=200)
        assert (
            deliver(factory, low_event("2.00", at=T0), webhook_id="msg_z", webhook_ts=100)
            == Outcome.SUPERSEDED
        )
        assert (
            deliver(factory, low_event("3.00", at=T0), webhook_id="msg_c", webhook_ts=200)
            == Outcome.APPLIED
        )
        assert account(factory).alert_available_balance == Decimal("3.00")

    def test_a_later_top_up_does_not_clear_the_alert(self, factory: sessionmaker[Session]) -> None:
        deliver(factory, low_event("5.00", at=T0, percent=5), webhook_id="msg_low")
        deliver(factory, CHAIN[0], webhook_id="msg_topup")
        held = account(factory)
        assert (held.alert_available_balance, held.alert_threshold_percent) == (
            Decimal("5.00"),
            5,
        )
        assert held.balance == Decimal("100.00")


class TestOrderChain:
    def test_a_tie_with_no_possible_link_is_ordered_by_id_and_flagged(self) -> None:
        links = [
            ChainLink("b", T0, Decimal(5), Decimal(6), Decimal(0), Decimal(0)),
            ChainLink("a", T0, Decimal(1), Decimal(2), Decimal(0), Decimal(0)),
        ]
        chain = order_chain(links)
        assert [e.id for e in chain.entries] == ["a", "b"]
        assert chain.ok is False

    def test_a_large_tie_is_followed_along_the_chain(self) -> None:
        links = [
            ChainLink(f"e{9 - i}", T0, Decimal(i), Decimal(i + 1), Decimal(0), Decimal(0))
            for i in range(9)
        ]
        chain = order_chain(links)
        assert [e.id for e in chain.entries] == [f"e{9 - i}" for i in range(9)]
        assert chain.ok is True


@pytest.fixture
def client(settings: Settings) -> Iterator[FlaskClient]:
    app = create_app(settings)
    yield app.test_client()
    app.extensions["dodo"].close()


AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


class TestCreditsApi:
    def test_lists_each_account_with_decimal_strings_and_the_alert(
        self, client: FlaskClient, factory: sessionmaker[Session]
    ) -> None:
        for i, event in enumerate(CHAIN):
            deliver(factory, event, webhook_id=f"msg_{i}")
        deliver(factory, low_event("8.00", at=T0 + timedelta(hours=2)), webhook_id="msg_low")
        answer = client.get(f"/api/customers/{CUSTOMER}/credits", headers=AUTH)
        assert answer.status_code == 200
        assert answer.json == [
            {
                "credit_entitlement_id": ENTITLEMENT,
                "balance": "30.00",
                "overage": "12.25",
                "chain_ok": True,
                "last_entry_at": (T0 + timedelta(minutes=3)).isoformat(),
                "entry_count": 4,
                "low_balance_alert": {
                    "available_balance": "8.00",
                    "threshold_percent": 10,
                    "threshold_amount": "20.00",
                    "timestamp": (T0 + timedelta(hours=2)).isoformat(),
                },
            }
        ]

    def test_ledger_lists_entries_oldest_first(
        self, client: FlaskClient, factory: sessionmaker[Session]
    ) -> None:
        for i in (2, 0, 3, 1):
            deliver(factory, CHAIN[i], webhook_id=f"msg_{i}")
        answer = client.get(f"/api/customers/{CUSTOMER}/credits/{ENTITLEMENT}/ledger", headers=AUTH)
        assert answer.status_code == 200
        entries = answer.json
        assert [e["id"] for e in entries] == ["cle_1", "cle_2", "cle_3", "cle_4"]
        assert entries[2] == {
            "id": "cle_3",
            "type": "credit.overage_charged",
            "transaction_type": "overage_charged",
            "is_credit": False,
            "amount": "60.50",
            "balance_before": "60.50",
            "balance_after": "0.00",
            "overage_before": "0.00",
            "overage_after": "12.25",
            "created_at": (T0 + timedelta(minutes=2)).isoformat(),
            "webhook_id": "msg_2",
        }

    def test_unknown_customer_is_404_json(self, client: FlaskClient) -> None:
        answer = client.get("/api/customers/cus_nobody/credits", headers=AUTH)
        assert answer.status_code == 404
        assert "cus_nobody" in answer.json["error"]

    def test_known_customer_without_credits_gets_an_empty_list(
        self, client: FlaskClient, factory: sessionmaker[Session]
    ) -> None:
        with transaction(factory) as session:
            session.add(
                Payment(
                    payment_id="pay_1",
                    status="succeeded",
                    total_amount=100,
                    currency="USD",
                    customer_id="cus_payer",
                    last_event_type="payment.succeeded",
                    last_event_at=T0,
                    last_webhook_ts=1,
                    last_webhook_id="msg_p",
                    data={},
                )
            )
        answer = client.get("/api/customers/cus_payer/credits", headers=AUTH)
        assert (answer.status_code, answer.json) == (200, [])

    def test_unknown_ledger_is_404_json(self, client: FlaskClient) -> None:
        answer = client.get(f"/api/customers/{CUSTOMER}/credits/cde_none/ledger", headers=AUTH)
        assert answer.status_code == 404
        assert answer.is_json

    def test_requires_the_bearer_token(self, client: FlaskClient) -> None:
        assert client.get(f"/api/customers/{CUSTOMER}/credits").status_code == 401


class TestOnSqlite:
    def test_the_embedded_mode_keeps_the_same_ledger(self, tmp_path: Path) -> None:
        """`dodo-webhooks dev` runs on SQLite: same dialect insert, exact decimals as text."""
        engine = make_engine(f"sqlite:///{tmp_path / 'dev.db'}")
        Base.metadata.create_all(engine)
        factory = make_sessionmaker(engine)
        try:
            for i in (3, 1, 0, 2):
                assert deliver(factory, CHAIN[i], webhook_id=f"msg_{i}") == Outcome.APPLIED
            assert deliver(factory, CHAIN[1], webhook_id="msg_again") == Outcome.SUPERSEDED
            held = account(factory)
            assert (str(held.balance), str(held.overage), held.chain_ok, held.entry_count) == (
                "30.00",
                "12.25",
                True,
                4,
            )
        finally:
            engine.dispose()
