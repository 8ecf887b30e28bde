"""The read API for payments, refunds, disputes, subscriptions and license keys."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask.testing import FlaskClient
from sqlalchemy.orm import Session, sessionmaker

from ingest import create_app
from shared.db import make_engine, make_sessionmaker
from shared.settings import Settings
from tests.handlers.events import apply, at, make_event
from tests.support import ADMIN_TOKEN

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def client(settings: Settings) -> Iterator[FlaskClient]:
    app = create_app(settings)
    yield app.test_client()
    app.extensions["dodo"].close()


@pytest.fixture
def factory(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings.database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


class TestPaymentRecord:
    def test_returns_dodo_fields_and_the_event_that_set_them(
        self, client: FlaskClient, factory: sessionmaker[Session]
    ) -> None:
        event, delivery = make_event(
            "payment.succeeded",
            when=at(5),
            payment_id="pay_1",
            total_amount=1999,
            currency="USD",
            customer={"customer_id": "cus_1", "email": "a@example.com", "name": "A"},
            subscription_id="sub_1",
            refund_status="full",
        )
        apply(factory, event, delivery)
        apply(factory, *make_event("payment.processing", when=at(0), payment_id="pay_1"))
        answer = client.get("/api/payments/pay_1", headers=AUTH)
        assert answer.status_code == 200
        body = answer.get_json()
        assert {k: body[k] for k in ("payment_id", "status", "total_amount", "currency")} == {
            "payment_id": "pay_1",
            "status": "succeeded",
            "total_amount": 1999,
            "currency": "USD",
        }
        assert (body["customer_id"], body["subscription_id"], body["refund_status"]) == (
            "cus_1",
            "sub_1",
            "full",
        )
        assert body["payment_method"] == "card"  # Dodo's own fields come through
        assert body["last_event"] == {
            "type": "payment.succeeded",
            "timestamp": "2026-03-01T12:00:05+00:00",
            "webhook_id": delivery.webhook_id,
        }

    def test_unknown_payment_is_404_json(self, client: FlaskClient) -> None:
        answer = client.get("/api/payments/pay_nope", headers=AUTH)
        assert answer.status_code == 404
        assert "error" in answer.get_json()

    def test_returns_401_without_the_token(self, client: FlaskClient) -> None:
        assert client.get("/api/payments/pay_1").status_code == 401


class TestRefundRecord:
    def test_returns_dodo_fields(self, client: FlaskClient, factory: sessionmaker[Session]) -> None:
        apply(
            factory,
            *make_event("refund.failed", refund_id="ref_1", payment_id="pay_1", amount=300),
        )
        body = client.get("/api/refunds/ref_1", headers=AUTH).get_json()
        assert {
            k: body[k] for k in ("refund_id", "payment_id", "status", "amount", "currency")
        } == {
            "refund_id": "ref_1",
            "payment_id": "pay_1",
            "status": "failed",
            "amount": 300,
            "currency": "USD",
        }
        assert body["last_event"]["type"] == "refund.failed"

    def test_unknown_refund_is_404_json(self, client: FlaskClient) -> None:
        answer = client.get("/api/refunds/ref_nope", headers=AUTH)
        assert answer.status_code == 404
        assert "error" in answer.get_json()

    def test_returns_401_with_a_wrong_token(self, client: FlaskClient) -> None:
        answer = client.get("/api/refunds/ref_1", headers={"Authorization": "Bearer nope"})
        assert answer.status_code == 401


class TestDisputeRecord:
    def test_returns_the_latest_state_and_the_history_in_occurrence_order(
        self, client: FlaskClient, factory: sessionmaker[Session]
    ) -> None:
        for event_type, seconds in [
            ("dispute.lost", 30),
            ("dispute.opened", 0),
            ("dispute.challenged", 10),
        ]:
            apply(
                factory,
                *make_event(event_type, when=at(seconds), dispute_id="dis_1", amount="10.50"),
            )
        body = client.get("/api/disputes/dis_1", headers=AUTH).get_json()
        assert (body["dispute_id"], body["payment_id"], body["currency"]) == (
            "dis_1",
            "pay_sample0001",
            "USD",
        )
        assert (body["dispute_status"], body["dispute_stage"]) == ("dispute_lost", "pre_dispute")
        assert body["amount"] == "10.50"
        assert [
            (step["type"], step["dispute_status"], step["dispute_stage"], step["timestamp"])
            for step in body["history"]
        ] == [
            ("dispute.opened", "dispute_opened", "pre_dispute", "2026-03-01T12:00:00+00:00"),
            (
                "dispute.challenged",
                "dispute_challenged",
                "pre_dispute",
                "2026-03-01T12:00:10+00:00",
            ),
            ("dispute.lost", "dispute_lost", "pre_dispute", "2026-03-01T12:00:30+00:00"),
        ]

    def test_unknown_dispute_is_404_json(self, client: FlaskClient) -> None:
        answer = client.get("/api/disputes/dis_nope", headers=AUTH)
        assert answer.status_code == 404
        assert "error" in answer.get_json()

    def test_returns_401_without_the_token(self, client: FlaskClient) -> None:
        assert client.get("/api/disputes/dis_1").status_code == 401


class TestSubscriptionRecord:
    def test_returns_dodo_fields_and_a_history_of_changes(
        self, client: FlaskClient, factory: sessionmaker[Session]
    ) -> None:
        apply(
            factory,
            *make_event(
                "subscription.active",
                when=at(0),
                subscription_id="sub_1",
                quantity=2,
                cancelled_at=None,
                next_billing_date="2026-04-01T00:00:00Z",
                previous_billing_date="2026-03-01T00:00:00Z",
            ),
        )
        apply(
            factory,
            *make_event(
                "subscription.cancelled",
                when=at(60),
                subscription_id="sub_1",
                quantity=2,
                cancel_at_next_billing_date=True,
                cancelled_at="2026-03-01T12:01:00Z",
                next_billing_date="2026-04-01T00:00:00Z",
                previous_billing_date="2026-03-01T00:00:00Z",
            ),
        )
        body = client.get("/api/subscriptions/sub_1", headers=AUTH).get_json()
        assert {
            k: body[k]
            for k in (
                "subscription_id",
                "status",
                "product_id",
                "quantity",
                "customer_id",
                "next_billing_date",
                "previous_billing_date",
                "cancel_at_next_billing_date",
                "cancelled_at",
            )
        } == {
            "subscription_id": "sub_1",
            "status": "cancelled",
            "product_id": "pdt_sample0001",
            "quantity": 2,
            "customer_id": "cus_sample0001",
            "next_billing_date": "2026-04-01T00:00:00+00:00",
            "previous_billing_date": "2026-03-01T00:00:00+00:00",
            "cancel_at_next_billing_date": True,
            "cancelled_at": "2026-03-01T12:01:00+00:00",
        }
        assert [step["type"] for step in body["history"]] == [
            "subscription.active",
            "subscription.cancelled",
        ]
        assert body["last_event"]["type"] == "subscription.cancelled"

    def test_unknown_subscription_is_404_json(self, client: FlaskClient) -> None:
        answer = client.get("/api/subscriptions/sub_nope", headers=AUTH)
        assert answer.status_code == 404
        assert "error" in answer.get_json()

    def test_returns_401_without_the_token(self, client: FlaskClient) -> None:
        assert client.get("/api/subscriptions/sub_1").status_code == 401


class TestLicenseKeyRecord:
    def test_returns_dodo_fields(self, client: FlaskClient, factory: sessionmaker[Session]) -> None:
        apply(
            factory,
            *make_event(
                "license_key.created",
                id="lk_1",
                key="KEY-1",
                customer_id="cus_1",
                product_id="pdt_1",
                expires_at=None,
            ),
        )
        body = client.get("/api/license-keys/lk_1", headers=AUTH).get_json()
        assert {k: body[k] for k in ("id", "key", "status", "customer_id", "product_id")} == {
            "id": "lk_1",
            "key": "KEY-1",
            "status": "active",
            "customer_id": "cus_1",
            "product_id": "pdt_1",
        }
        assert body["expires_at"] is None
        assert body["last_event"]["type"] == "license_key.created"

    def test_unknown_license_key_is_404_json(self, client: FlaskClient) -> None:
        answer = client.get("/api/license-keys/lk_nope", headers=AUTH)
        assert answer.status_code == 404
        assert "error" in answer.get_json()

    def test_returns_401_without_the_token(self, client: FlaskClient) -> None:
        assert client.get("/api/license-keys/lk_1").status_code == 401
