"""Retention and erasure with the real ingest (gunicorn) and real Celery workers running."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import requests
from celery import Celery
from flask.testing import FlaskClient
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from ingest import create_app
from shared.models import CreditBalance, CreditEntry, EventStatus, Payment, WebhookEvent
from shared.queue import PURGE, make_celery
from shared.settings import Settings
from tests.lifecycle_support import ALICE, BOB, age, body_for, dump, found_in, into_rows
from tests.support import (
    ADMIN_TOKEN,
    celery_worker,
    gunicorn,
    signed_headers,
    stored_event,
    wait_until,
)
from tests.test_metrics import parse, value

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def post(url: str, envelope: dict[str, Any], webhook_id: str) -> requests.Response:
    body = json.dumps(envelope)
    return requests.post(
        f"{url}/webhooks/dodo",
        data=body,
        headers=signed_headers(body, webhook_id=webhook_id),
        timeout=10,
    )


def statuses(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        rows = conn.execute(select(WebhookEvent.webhook_id, WebhookEvent.status)).all()
    return {row.webhook_id: row.status for row in rows}


def all_final(engine: Engine, count: int) -> bool:
    done = [s for s in statuses(engine).values() if s in ("processed", "ignored")]
    return len(done) == count


@pytest.fixture
def celery(settings: Settings) -> Iterator[Celery]:
    app = make_celery(settings)
    yield app
    app.close()


class TestRetentionInThePipeline:
    """A purged delivery that Dodo sends again is a duplicate, and nothing is applied twice."""

    def test_a_late_retry_of_a_purged_delivery_answers_200_duplicate_and_applies_nothing(
        self, env: dict[str, str], clean_db: Engine, tmp_path: Path, celery: Celery
    ) -> None:
        t0 = datetime.now(UTC) - timedelta(days=40)
        old = [
            ("msg_old_pay", body_for("payment.succeeded", ALICE, t0, payment_id="pay_a")),
            (
                "msg_old_credit",
                body_for(
                    "credit.added",
                    ALICE,
                    t0,
                    id="cle_1",
                    credit_entitlement_id="cde_1",
                    amount="10.00",
                    balance_before="0.00",
                    balance_after="10.00",
                ),
            ),
        ]
        recent = ("msg_recent", body_for("payment.succeeded", BOB, t0, payment_id="pay_b"))
        worker_env = {**env, "RETENTION_DAYS": "30"}
        with gunicorn(env, tmp_path) as url, celery_worker(worker_env, tmp_path):
            for webhook_id, envelope in [*old, recent]:
                assert post(url, envelope, webhook_id).status_code == 202
            wait_until(lambda: all_final(clean_db, 3), what="three events processed")
            # The old credit as if received 40 days ago: its body in that day's partition,
            # which the purge drops whole.
            age(clean_db, ["msg_old_credit"], days=40)
            # As if recorded before migration 0006 (so before 0008: bodies in their rows): the
            # same task fills these in, the old payment's too, before the purge takes the body
            # they are read from; the old payment's is purged in place.
            into_rows(clean_db, ["msg_recent", "msg_old_pay"])
            with clean_db.begin() as conn:
                conn.execute(
                    update(WebhookEvent)
                    .where(WebhookEvent.webhook_id == "msg_old_pay")
                    .values(processed_at=datetime.now(UTC) - timedelta(days=31))
                )
                conn.execute(
                    update(WebhookEvent)
                    .where(WebhookEvent.webhook_id.in_(["msg_recent", "msg_old_pay"]))
                    .values(customer_id=None, payment_id=None)
                )
            # Beat's job, sent as beat sends it, run by the worker on the maintenance queue.
            celery.send_task(PURGE)

            def purged() -> bool:
                with Session(clean_db) as session:
                    recent = session.get(WebhookEvent, "msg_recent")
                    return (
                        all(stored_event(clean_db, w).purged_at is not None for w, _ in old)
                        and recent is not None
                        and recent.customer_id == BOB.customer_id
                    )

            wait_until(purged, what="the purge task to record the subjects, then purge")
            with Session(clean_db) as session:
                recent_row = session.get(WebhookEvent, "msg_recent")
                assert recent_row is not None and recent_row.body is not None
                assert recent_row.payment_id == "pay_b"
                old_pay = session.get(WebhookEvent, "msg_old_pay")
                assert old_pay is not None and old_pay.body is None
                assert stored_event(clean_db, "msg_old_credit").body is None
                assert (old_pay.customer_id, old_pay.payment_id) == (ALICE.customer_id, "pay_a")
                before = {
                    w: (r.status, r.attempts, r.processed_at)
                    for w in ("msg_old_pay", "msg_old_credit")
                    if (r := session.get(WebhookEvent, w)) is not None
                }

            for webhook_id, envelope in old:
                answer = post(url, envelope, webhook_id)
                assert answer.status_code == 200, answer.text
                assert answer.json()["status"] == "duplicate"

            with Session(clean_db) as session:
                after = {
                    w: (r.status, r.attempts, r.processed_at)
                    for w in before
                    if (r := session.get(WebhookEvent, w)) is not None
                }
                assert after == before
                balance = session.get(CreditBalance, (ALICE.customer_id, "cde_1"))
                assert balance is not None and balance.balance == Decimal("10.00")
                assert session.scalar(select(func.count()).select_from(CreditEntry)) == 1
            scraped = parse(requests.get(f"{url}/metrics", timeout=10).text)
            assert value(scraped, "dodo_webhooks_purged_events_total") == 2
            assert value(scraped, "dodo_webhooks_purged_bytes_total") > 0
            # The oldest body kept is the recent one's: processed moments ago.
            assert value(scraped, "dodo_webhooks_oldest_body_age_seconds") < 600


class TestBeatSchedule:
    def test_beat_runs_the_purge_on_the_maintenance_queue_at_its_interval(self) -> None:
        from shared.catalog import MAINTENANCE_QUEUE
        from workers.tasks import app, settings

        entries = {e["task"]: e["schedule"] for e in app.conf.beat_schedule.values()}
        assert entries[PURGE] == settings.purge_interval_seconds
        assert app.conf.task_routes[PURGE] == {"queue": MAINTENANCE_QUEUE}


class TestErasureWhileEventsFlow:
    """Erasing a customer while a worker applies that customer's events loses nothing."""

    def test_every_event_is_applied_the_ledger_holds_and_no_personal_data_is_left(
        self, env: dict[str, str], clean_db: Engine, pg_url: str, tmp_path: Path
    ) -> None:
        entries = 120
        t0 = datetime.now(UTC) - timedelta(hours=1)
        events: list[tuple[str, dict[str, Any]]] = []
        for n in range(entries):
            events.append(
                (
                    f"msg_credit_{n:04d}",
                    body_for(
                        "credit.added",
                        ALICE,
                        t0 + timedelta(seconds=n),
                        id=f"cle_{n:04d}",
                        credit_entitlement_id="cde_1",
                        amount="1.00",
                        balance_before=f"{n}.00",
                        balance_after=f"{n + 1}.00",
                        description=f"top-up for {ALICE.email}",
                    ),
                )
            )
            if n % 4 == 0:
                events.append(
                    (
                        f"msg_pay_{n:04d}",
                        body_for(
                            "payment.succeeded",
                            ALICE,
                            t0 + timedelta(seconds=n),
                            payment_id=f"pay_{n:04d}",
                        ),
                    )
                )
        sent: list[str] = []
        answers: list[dict[str, Any]] = []
        with (
            gunicorn(env, tmp_path) as url,
            celery_worker(env, tmp_path, concurrency=2),
        ):

            def send_all() -> None:
                for webhook_id, envelope in events:
                    assert post(url, envelope, webhook_id).status_code == 202
                    sent.append(webhook_id)

            sender = threading.Thread(target=send_all)
            sender.start()
            wait_until(lambda: len(sent) > len(events) // 3, what="a third of the events sent")
            # Twice while events flow: the second run must find what the first could not.
            for _ in range(2):
                answer = requests.post(
                    f"{url}/api/customers/{ALICE.customer_id}/erase", headers=AUTH, timeout=60
                )
                assert answer.status_code == 200, answer.text
                answers.append(answer.json())
            sender.join(timeout=120)
            assert len(sent) == len(events)
            wait_until(lambda: all_final(clean_db, len(events)), timeout=120, what="all applied")

        with Session(clean_db) as session:
            balance = session.get(CreditBalance, (ALICE.customer_id, "cde_1"))
            assert balance is not None
            assert (balance.balance, balance.entry_count, balance.chain_ok) == (
                Decimal(f"{entries}.00"),
                entries,
                True,
            )
            payments = session.scalar(select(func.count()).select_from(Payment))
            assert payments == len(events) - entries
            assert set(statuses(clean_db).values()) == {EventStatus.PROCESSED}
        dumped = dump(pg_url)
        for what, secret in ALICE.secrets.items():
            assert not found_in(dumped, secret), what
        assert all(a["counts"]["webhook_events"]["rows"] > 0 for a in answers)


@pytest.fixture
def client(settings: Settings) -> Iterator[FlaskClient]:
    app = create_app(settings)
    yield app.test_client()
    app.extensions["dodo"].close()


class TestEraseRoute:
    """POST /api/customers/<id>/erase, behind the admin token."""

    def test_without_the_token_it_is_401_and_nothing_is_recorded(
        self, client: FlaskClient, clean_db: Engine
    ) -> None:
        answer = client.post(f"/api/customers/{ALICE.customer_id}/erase")
        assert answer.status_code == 401
        from shared.models import CustomerErasure

        with Session(clean_db) as session:
            assert session.scalar(select(func.count()).select_from(CustomerErasure)) == 0

    def test_a_dry_run_answers_the_counts_and_records_nothing(
        self, client: FlaskClient, clean_db: Engine
    ) -> None:
        from tests.lifecycle_support import Feed

        Feed(clean_db).send(body_for("payment.succeeded", ALICE, datetime.now(UTC)))
        answer = client.post(
            f"/api/customers/{ALICE.customer_id}/erase", json={"dry_run": True}, headers=AUTH
        )
        assert answer.status_code == 200
        got = answer.get_json()
        assert (got["dry_run"], got["erasure_id"]) == (True, None)
        assert got["counts"]["webhook_events"] == {"rows": 1, "changed": 1}
        assert got["counts"]["payments"] == {"rows": 1, "changed": 1}
        real = client.post(f"/api/customers/{ALICE.customer_id}/erase", headers=AUTH).get_json()
        assert real["erasure_id"] is not None and real["counts"] == got["counts"]
        assert real["finished_at"] is not None

    @pytest.mark.parametrize(
        ("body", "error"),
        [
            ('{"dry_run": "yes"}', "dry_run must be true or false"),
            ('{"everything": true}', "unknown field(s): everything"),
            ("[1]", "the body must be a JSON object"),
        ],
    )
    def test_a_malformed_body_is_400(self, client: FlaskClient, body: str, error: str) -> None:
        answer = client.post(f"/api/customers/{ALICE.customer_id}/erase", data=body, headers=AUTH)
        assert answer.status_code == 400
        assert error in answer.get_json()["error"]
