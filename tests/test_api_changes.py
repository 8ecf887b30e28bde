"""The change feed's admin routes (ingest/changes.py) and `dodo-webhooks changes`."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from cli.main import main
from ingest import create_app
from shared.changes import fan_out
from shared.db import make_engine, make_sessionmaker, transaction
from shared.models import DeliveryStatus, OutboundAttempt, OutboundDelivery
from shared.settings import Settings
from tests.handlers.events import at, make_event
from tests.support import ADMIN_TOKEN
from workers.handlers import ROUTES

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
URL = "http://127.0.0.1:9/hooks"


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


def apply_with_deliveries(factory: sessionmaker[Session], event_type: str, **data: object) -> None:
    event, delivery = make_event(event_type, **data)  # type: ignore[arg-type]
    with transaction(factory) as session:
        ROUTES[event_type](session, event, delivery)
        fan_out(session, (URL,))


def bury_all(factory: sessionmaker[Session]) -> None:
    with transaction(factory) as session:
        session.execute(update(OutboundDelivery).values(status=DeliveryStatus.DEAD, attempts=12))
        for delivery_id in session.scalars(select(OutboundDelivery.id)):
            session.add(
                OutboundAttempt(
                    delivery_id=delivery_id,
                    attempt=1,
                    started_at=at(0),
                    duration_ms=3.5,
                    status_code=500,
                    error="HTTP 500",
                    response_head="oops",
                )
            )


class TestGetChanges:
    def test_pages_oldest_first_with_next_after(
        self, client: FlaskClient, factory: sessionmaker[Session]
    ) -> None:
        apply_with_deliveries(factory, "payment.processing", when=at(0), payment_id="pay_1")
        apply_with_deliveries(factory, "payment.succeeded", when=at(5), payment_id="pay_1")
        apply_with_deliveries(factory, "refund.succeeded", refund_id="ref_1")
        first = client.get("/api/changes?limit=2", headers=AUTH).get_json()
        assert [c["kind"] for c in first["changes"]] == ["payment", "payment"]
        assert first["changes"][1]["before"] == first["changes"][0]["after"]
        rest = client.get(f"/api/changes?after={first['next_after']}", headers=AUTH).get_json()
        assert [c["entity_id"] for c in rest["changes"]] == ["ref_1"]
        empty = client.get(f"/api/changes?after={rest['next_after']}", headers=AUTH).get_json()
        assert empty == {"changes": [], "next_after": rest["next_after"]}

    def test_filters_by_kind_and_entity_id(
        self, client: FlaskClient, factory: sessionmaker[Session]
    ) -> None:
        apply_with_deliveries(factory, "payment.succeeded", payment_id="pay_1")
        apply_with_deliveries(factory, "payment.succeeded", payment_id="pay_2")
        apply_with_deliveries(factory, "refund.succeeded", refund_id="ref_1")
        by_kind = client.get("/api/changes?kind=refund", headers=AUTH).get_json()
        assert [c["entity_id"] for c in by_kind["changes"]] == ["ref_1"]
        by_entity = client.get("/api/changes?entity_id=pay_2", headers=AUTH).get_json()
        assert [c["entity_id"] for c in by_entity["changes"]] == ["pay_2"]

    @pytest.mark.parametrize("query", ["after=x", "limit=0", "limit=5000", "kind=invoice"])
    def test_answers_400_for_a_bad_parameter(self, client: FlaskClient, query: str) -> None:
        answer = client.get(f"/api/changes?{query}", headers=AUTH)
        assert answer.status_code == 400
        assert "error" in answer.get_json()

    def test_needs_the_admin_token(self, client: FlaskClient) -> None:
        assert client.get("/api/changes").status_code == 401


class TestDeliveries:
    def test_lists_filters_and_shows_attempts(
        self, client: FlaskClient, factory: sessionmaker[Session]
    ) -> None:
        apply_with_deliveries(factory, "payment.succeeded", payment_id="pay_1")
        [pending] = client.get("/api/changes/deliveries", headers=AUTH).get_json()["deliveries"]
        assert pending["status"] == "pending" and pending["url"] == URL
        bury_all(factory)
        dead = client.get("/api/changes/deliveries?status=dead", headers=AUTH).get_json()
        assert [d["id"] for d in dead["deliveries"]] == [pending["id"]]
        assert client.get("/api/changes/deliveries?status=pending", headers=AUTH).get_json() == {
            "deliveries": []
        }
        detail = client.get(f"/api/changes/deliveries/{pending['id']}", headers=AUTH).get_json()
        assert detail["attempts_made"][0]["status_code"] == 500
        assert detail["attempts_made"][0]["response_head"] == "oops"
        assert client.get("/api/changes/deliveries/999", headers=AUTH).status_code == 404

    def test_retry_dry_run_counts_and_retry_sets_dead_ones_pending(
        self, client: FlaskClient, factory: sessionmaker[Session]
    ) -> None:
        apply_with_deliveries(factory, "payment.succeeded", payment_id="pay_1")
        apply_with_deliveries(factory, "refund.succeeded", refund_id="ref_1")
        bury_all(factory)
        dry = client.post(
            "/api/changes/deliveries/retry", json={"status": "dead", "dry_run": True}, headers=AUTH
        ).get_json()
        assert (dry["matched"], dry["requeued"]) == (2, 0)
        done = client.post(
            "/api/changes/deliveries/retry", json={"status": "dead"}, headers=AUTH
        ).get_json()
        assert (done["matched"], done["requeued"]) == (2, 2)
        listed = client.get("/api/changes/deliveries", headers=AUTH).get_json()["deliveries"]
        assert {d["status"] for d in listed} == {"pending"}
        assert {d["attempts"] for d in listed} == {0}

    def test_retry_without_a_filter_is_refused(self, client: FlaskClient) -> None:
        answer = client.post("/api/changes/deliveries/retry", json={}, headers=AUTH)
        assert answer.status_code == 400


class TestChangesCommand:
    def test_list_show_and_retry_as_tables_and_json(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        apply_with_deliveries(factory, "subscription.active", subscription_id="sub_1")
        bury_all(factory)
        db = ["--database-url", settings.database_url]
        assert main(["changes", "list", "--status", "dead", *db]) == 0
        table = capsys.readouterr().out
        assert "CHANGE_ID" in table and "dead" in table and "1 deliveries" in table
        assert main(["changes", "list", "--feed", "--json", *db]) == 0
        feed = json.loads(capsys.readouterr().out)
        change_id = feed["changes"][0]["id"]
        assert feed["changes"][0]["kind"] == "subscription"
        assert main(["changes", "show", change_id, str(feed_delivery(factory)), *db]) == 0
        shown = capsys.readouterr().out
        assert change_id in shown and "#1" in shown
        assert main(["changes", "retry", "--status", "dead", "--dry-run", "--json", *db]) == 0
        assert json.loads(capsys.readouterr().out)["matched"] == 1
        assert main(["changes", "retry", "--change-id", change_id, *db]) == 0
        assert "1 deliveries matched, 1 set pending" in capsys.readouterr().out

    def test_unknown_id_is_one_line_and_exit_1(
        self, settings: Settings, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert main(["changes", "show", "chg_nope", "--database-url", settings.database_url]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "chg_nope" in err


def feed_delivery(factory: sessionmaker[Session]) -> int:
    with factory() as session:
        return int(session.scalars(select(OutboundDelivery.id)).one())


class TestOutboundMetrics:
    def test_pending_dead_and_failed_are_counted_by_url(
        self, client: FlaskClient, factory: sessionmaker[Session]
    ) -> None:
        apply_with_deliveries(factory, "payment.succeeded", payment_id="pay_1")
        apply_with_deliveries(factory, "refund.succeeded", refund_id="ref_1")
        text = client.get("/metrics").get_data(as_text=True)
        assert f'dodo_webhooks_outbound_pending{{url="{URL}"}} 2.0' in text
        assert f'dodo_webhooks_outbound_oldest_pending_age_seconds{{url="{URL}"}}' in text
        bury_all(factory)
        text = client.get("/metrics").get_data(as_text=True)
        assert f'dodo_webhooks_outbound_pending{{url="{URL}"}} 0.0' in text
        assert f'dodo_webhooks_outbound_dead{{url="{URL}"}} 2.0' in text
        assert f'dodo_webhooks_outbound_failed_total{{url="{URL}"}} 2.0' in text
