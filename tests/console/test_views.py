"""The console's pages on a real database: what each shows, the dry-run-first retry, search."""

from __future__ import annotations

import html
import re
from datetime import timedelta

from flask.testing import FlaskClient
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from ingest import create_app
from shared.db import utcnow
from shared.models import (
    Change,
    DeliveryStatus,
    EventStatus,
    OutboundDelivery,
    ReconcileRun,
    WebhookEvent,
)
from shared.settings import Settings
from tests.console.conftest import csrf_token, deliver, sign_in
from tests.dead_letter_support import event_row, hours_ago, queued_tasks, store_event
from tests.handlers.events import at
from tests.support import free_port

SCRIPT = "<script>alert('x')</script>"


def text(answer: object) -> str:
    return answer.get_data(as_text=True)  # type: ignore[attr-defined, no-any-return]


def ids_on(page: str) -> list[str]:
    return re.findall(r'/console/events/([^"]+)"', page)


class TestOverview:
    def test_counts_by_status_oldest_pending_and_dead_by_type(
        self, admin: FlaskClient, clean_db: Engine
    ) -> None:
        store_event(clean_db, "msg_dead1", "payment.succeeded")
        store_event(clean_db, "msg_dead2", "payment.succeeded")
        store_event(clean_db, "msg_dead3", "refund.failed")
        store_event(
            clean_db,
            "msg_pending",
            "payment.failed",
            status=EventStatus.PENDING,
            received_at=hours_ago(2),
        )
        page = text(admin.get("/console/"))
        assert re.search(r'data-status="dead">3<', page)
        assert re.search(r'data-status="pending">1<', page)
        assert re.search(r'id="oldest-pending">(1h 59m|2h 0m)<', page)
        assert re.search(r"payment\.succeeded</a></td><td class=\"num\">2<", page)
        assert "<svg" in page and "4 received" not in page  # the chart: 3 now, 1 two hours ago
        assert "3 received, 3 dead now" in page

    def test_shows_the_latest_reconciliation_runs(
        self, admin: FlaskClient, factory: sessionmaker[Session]
    ) -> None:
        assert "none yet: <code>dodo-webhooks reconcile</code>" in text(admin.get("/console/"))
        with factory() as session, session.begin():
            session.add(
                ReconcileRun(
                    trigger="beat",
                    started_at=utcnow(),
                    families="payments",
                    listed=40,
                    missing=3,
                    differs=2,
                    recorded=5,
                    api_calls=7,
                    counts={},
                )
            )
        page = text(admin.get("/console/"))
        assert re.search(r"<td>beat</td><td>payments</td>\s*<td class=\"num\">40</td>", page)


class TestEvents:
    def test_pages_do_not_shift_when_new_events_arrive(
        self, admin: FlaskClient, clean_db: Engine
    ) -> None:
        for n in range(60):
            store_event(
                clean_db,
                f"msg_{n:03d}",
                "payment.succeeded",
                status=EventStatus.PROCESSED,
                received_at=hours_ago(10) + timedelta(seconds=n),
            )
        first = text(admin.get("/console/events"))
        assert ids_on(first)[:2] == ["msg_059", "msg_058"] and len(ids_on(first)) == 50
        older = re.search(r'rel="next" href="([^"]+)"', first)
        assert older
        for n in range(5):
            store_event(clean_db, f"new_{n}", "payment.succeeded", status=EventStatus.PENDING)
        second = text(admin.get(html.unescape(older.group(1))))
        assert ids_on(second) == [f"msg_{n:03d}" for n in range(9, -1, -1)]
        assert 'rel="next"' not in second

    def test_filters_by_status_type_glob_and_time(
        self, admin: FlaskClient, clean_db: Engine
    ) -> None:
        store_event(clean_db, "msg_sub", "subscription.active", status=EventStatus.PROCESSED)
        store_event(clean_db, "msg_sub_dead", "subscription.on_hold")
        store_event(clean_db, "msg_pay", "payment.succeeded", received_at=hours_ago(30))
        assert ids_on(text(admin.get("/console/events?type=subscription.*"))) == [
            "msg_sub_dead",
            "msg_sub",
        ]
        assert ids_on(text(admin.get("/console/events?status=dead&since=1d"))) == ["msg_sub_dead"]
        assert ids_on(text(admin.get("/console/events?until=1d"))) == ["msg_pay"]

    def test_bad_filter_is_explained_with_400(self, admin: FlaskClient) -> None:
        answer = admin.get("/console/events?since=yesterday-ish")
        assert answer.status_code == 400
        assert "is not a time" in text(answer)


class TestEventPage:
    def test_shows_headers_pretty_body_attempts_error_and_records_touched(
        self, admin: FlaskClient, clean_db: Engine, factory: sessionmaker[Session]
    ) -> None:
        webhook_id = deliver(
            clean_db, factory, "payment.succeeded", payment_id="pay_e1", total_amount=1234
        )
        page = text(admin.get(f"/console/events/{webhook_id}"))
        assert "webhook-signature" in page
        assert "\n  &#34;type&#34;: &#34;payment.succeeded&#34;" in page  # indented JSON
        assert 'href="/console/payments/pay_e1"' in page
        assert "holds this event's state" in page

    def test_payload_script_renders_as_text(
        self, admin: FlaskClient, clean_db: Engine, factory: sessionmaker[Session]
    ) -> None:
        webhook_id = deliver(
            clean_db,
            factory,
            "payment.succeeded",
            payment_id="pay_x",
            customer={"customer_id": "cus_x", "email": "x@example.com", "name": SCRIPT},
        )
        for path in (
            f"/console/events/{webhook_id}",
            "/console/payments/pay_x",
            "/console/customers/cus_x",
        ):
            page = text(admin.get(path))
            assert SCRIPT not in page, path
            assert "&lt;script&gt;" in page, path
            assert "script-src" not in page

    def test_unknown_event_is_404(self, admin: FlaskClient) -> None:
        assert admin.get("/console/events/msg_nope").status_code == 404

    def test_a_purged_event_says_so_instead_of_a_body(
        self, admin: FlaskClient, clean_db: Engine, factory: sessionmaker[Session]
    ) -> None:
        """The retention keeps the row and clears `body` and `headers` (RETENTION_DAYS)."""
        webhook_id = deliver(clean_db, factory, "payment.succeeded", payment_id="pay_p1")
        with clean_db.begin() as conn:
            conn.execute(
                update(WebhookEvent)
                .where(WebhookEvent.webhook_id == webhook_id)
                .values(body=None, headers=None, purged_at=utcnow())
            )
        answer = admin.get(f"/console/events/{webhook_id}")
        assert answer.status_code == 200
        page = text(answer)
        assert "Purged " in page and "RETENTION_DAYS" in page
        assert "webhook-signature" not in page


class TestDeadLetterRetry:
    def test_dry_run_count_first_then_the_retry_and_its_result(
        self, admin: FlaskClient, clean_db: Engine, clean_redis: str
    ) -> None:
        for n in range(3):
            store_event(clean_db, f"msg_sub{n}", "subscription.active")
        store_event(clean_db, "msg_pay", "payment.succeeded")
        listed = text(admin.get("/console/dead-letters?type=subscription.*"))
        assert re.search(r'id="dead-total">3<', listed)
        token = csrf_token(admin, "/console/dead-letters")
        form = {"csrf_token": token, "scope": "matching", "type": "subscription.*"}
        preview = text(admin.post("/console/dead-letters/retry", data=form))
        assert re.search(r'id="dry-run-count">3<', preview)
        assert event_row(clean_db, "msg_sub0").status == EventStatus.DEAD
        done = text(admin.post("/console/dead-letters/retry", data={**form, "confirm": "1"}))
        assert re.search(r'id="retry-requeued">3<', done)
        assert {event_row(clean_db, f"msg_sub{n}").status for n in range(3)} == {"pending"}
        assert event_row(clean_db, "msg_pay").status == EventStatus.DEAD
        assert queued_tasks(clean_redis, "subscriptions") == ["workers.drain"]

    def test_selected_ids_only(self, admin: FlaskClient, clean_db: Engine) -> None:
        store_event(clean_db, "msg_a", "refund.failed")
        store_event(clean_db, "msg_b", "refund.failed")
        token = csrf_token(admin, "/console/dead-letters")
        form = {"csrf_token": token, "scope": "selected", "ids": ["msg_b"], "confirm": "1"}
        done = text(admin.post("/console/dead-letters/retry", data=form))
        assert re.search(r'id="retry-matched">1<', done)
        assert (event_row(clean_db, "msg_a").status, event_row(clean_db, "msg_b").status) == (
            "dead",
            "pending",
        )

    def test_nothing_selected_is_refused(self, admin: FlaskClient) -> None:
        token = csrf_token(admin, "/console/dead-letters")
        answer = admin.post("/console/dead-letters/retry", data={"csrf_token": token})
        assert answer.status_code == 400


class TestRecordsAndCustomers:
    def test_dispute_page_shows_its_history(
        self, admin: FlaskClient, clean_db: Engine, factory: sessionmaker[Session]
    ) -> None:
        deliver(clean_db, factory, "dispute.opened", when=at(0), dispute_id="dis_1")
        deliver(clean_db, factory, "dispute.won", when=at(10), dispute_id="dis_1")
        page = text(admin.get("/console/disputes/dis_1"))
        history = page[page.index("<h2>History</h2>") :]
        assert history.index("dispute.opened") < history.index("dispute.won")

    def test_customer_page_lists_records_and_credit_ledger_with_chain_status(
        self, admin: FlaskClient, clean_db: Engine, factory: sessionmaker[Session]
    ) -> None:
        customer = {"customer_id": "cus_c", "email": "c@example.com", "name": "C"}
        deliver(clean_db, factory, "payment.succeeded", payment_id="pay_c", customer=customer)
        deliver(
            clean_db, factory, "subscription.active", subscription_id="sub_c", customer=customer
        )
        deliver(
            clean_db,
            factory,
            "refund.succeeded",
            refund_id="ref_c",
            payment_id="pay_c",
            customer=customer,
        )
        deliver(
            clean_db,
            factory,
            "credit.added",
            id="cre_1",
            customer_id="cus_c",
            credit_entitlement_id="ent_c",
        )
        page = text(admin.get("/console/customers/cus_c"))
        for link in (
            "/console/payments/pay_c",
            "/console/subscriptions/sub_c",
            "/console/refunds/ref_c",
        ):
            assert f'href="{link}"' in page
        assert "ent_c" in page and "chain ok" in page and "credit.added" in page
        listing = text(admin.get("/console/customers"))
        assert 'href="/console/customers/cus_c"' in listing

    def test_unknown_customer_is_404(self, admin: FlaskClient) -> None:
        assert admin.get("/console/customers/cus_nobody").status_code == 404


class TestSearch:
    def test_any_id_opens_its_page(
        self, admin: FlaskClient, clean_db: Engine, factory: sessionmaker[Session]
    ) -> None:
        webhook_id = deliver(
            clean_db,
            factory,
            "payment.succeeded",
            payment_id="pay_s",
            customer={"customer_id": "cus_s", "email": "s@example.com", "name": "S"},
        )
        deliver(clean_db, factory, "license_key.created", id="lic_s", customer_id="cus_s")
        for query, target in [
            ("pay_s", "/console/payments/pay_s"),
            ("cus_s", "/console/customers/cus_s"),
            ("lic_s", "/console/license-keys/lic_s"),
            (webhook_id, f"/console/events/{webhook_id}"),
        ]:
            answer = admin.get(f"/console/search?q={query}")
            assert (answer.status_code, answer.headers.get("Location")) == (302, target)

    def test_nothing_found_is_404(self, admin: FlaskClient) -> None:
        answer = admin.get("/console/search?q=pay_missing")
        assert answer.status_code == 404
        assert "Nothing found" in text(answer)


class TestChanges:
    def test_lists_the_newest_changes_and_retries_a_dead_delivery(
        self, admin: FlaskClient, clean_db: Engine, factory: sessionmaker[Session]
    ) -> None:
        deliver(clean_db, factory, "subscription.active", subscription_id="sub_c1")
        with factory() as session, session.begin():
            change = session.scalars(select(Change)).one()
            session.add(
                OutboundDelivery(
                    change_seq=change.seq,
                    change_id=change.id,
                    url="http://127.0.0.1:9/hook",
                    kind=change.kind,
                    entity_id=change.entity_id,
                    status=DeliveryStatus.DEAD,
                    attempts=8,
                    last_status_code=500,
                    last_error="HTTP 500",
                )
            )
        page = text(admin.get("/console/changes"))
        assert "sub_c1" in page and "subscription.active" in page
        assert "Retry 1 dead delivery" in page and "HTTP 500" in page
        token = csrf_token(admin, "/console/changes")
        answer = admin.post("/console/changes/retry", data={"csrf_token": token})
        assert answer.status_code == 200
        assert "1 matched, 1 requeued" in text(answer)
        with factory() as session:
            assert session.scalars(select(OutboundDelivery.status)).one() == "pending"

    def test_a_retry_without_its_csrf_token_is_refused(self, admin: FlaskClient) -> None:
        assert admin.post("/console/changes/retry").status_code == 400


class TestFailures:
    def test_an_unreachable_database_gives_a_503_page_not_a_500(self, settings: Settings) -> None:
        gone = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nowhere"
        app = create_app(
            settings.model_copy(update={"database_url": gone}), check_connections=False
        )
        try:
            client = app.test_client()
            assert sign_in(client).status_code == 302
            answer = client.get("/console/events")
            assert answer.status_code == 503
            assert "Temporarily unavailable" in text(answer)
        finally:
            app.extensions["dodo"].close()
