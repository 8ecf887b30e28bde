"""`dodo-webhooks reconcile` against a fake Dodo API of the tests' own (tests/fake_dodo.py), a
real PostgreSQL and a real Celery worker applying what it records."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from cli.main import main
from ingest.metrics import render_metrics
from shared.db import make_sessionmaker
from shared.models import (
    CreditBalance,
    CreditEntry,
    EventStatus,
    LicenseKey,
    Payment,
    ReconcileRun,
    Refund,
    Subscription,
    WebhookEvent,
)
from shared.settings import Settings
from tests import fake_dodo as dodo
from tests.dead_letter_support import queued_tasks
from tests.handlers.events import make_event
from tests.support import celery_worker, stored_event, wait_until
from workers.handlers import ROUTES

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
API_KEY = "test-api-key"


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[dodo.FakeDodo]:
    with dodo.fake_dodo(tmp_path, api_key=API_KEY) as api:
        yield api


@pytest.fixture
def reconcile_env(
    settings: Settings, fake: dodo.FakeDodo, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """The command's environment, as a user sets it."""
    values = {
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "DODO_PAYMENTS_API_KEY": API_KEY,
        "DODO_PAYMENTS_BASE_URL": fake.url,
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["reconcile", *args])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    code, out, err = run(capsys, "--json", *args)
    assert code == 0, err
    return dict(json.loads(out))


def count(engine: Engine, model: Any) -> int:
    with Session(engine) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def all_final(engine: Engine) -> bool:
    with Session(engine) as session:
        open_events = session.scalar(
            select(func.count())
            .select_from(WebhookEvent)
            .where(WebhookEvent.status.not_in([EventStatus.PROCESSED, EventStatus.IGNORED]))
        )
    return open_events == 0 and count(engine, WebhookEvent) > 0


def apply_local(engine: Engine, event_type: str, *, when: datetime, **data: Any) -> None:
    """State the read model already holds, from an event applied as the worker would."""
    event, delivery = make_event(event_type, when=when, **data)
    factory = make_sessionmaker(engine)
    with factory() as session, session.begin():
        ROUTES[event_type](session, event, delivery)


def merchant(
    payments: int = 250, subscriptions: int = 120, license_keys: int = 110
) -> dict[str, Any]:
    """A merchant's account at Dodo: several pages of each family, and two credit ledgers."""
    entries = dodo.ledger("cde_1", "cus_1", [100, -10, -20, 50, -5], start=at(0))
    entries += dodo.ledger("cde_1", "cus_2", [40, -15], start=at(0))
    return {
        "payments": [
            dodo.payment(f"pay_{n:04d}", created_at=at(n), customer_id=f"cus_{n % 3 + 1}")
            for n in range(payments)
        ],
        "refunds": [
            dodo.refund(
                f"ref_{n:03d}",
                created_at=at(n),
                payment_id=f"pay_{n:04d}",
                status="pending" if n == 0 else "succeeded",
            )
            for n in range(30)
        ],
        "disputes": [
            dodo.dispute(f"dis_{n:03d}", created_at=at(n), payment_id=f"pay_{n:04d}")
            for n in range(15)
        ],
        "subscriptions": [
            dodo.subscription(
                f"sub_{n:04d}", created_at=at(n), status="paused" if n == 0 else "active"
            )
            for n in range(subscriptions)
        ],
        "license_keys": [
            dodo.license_key(f"lic_{n:04d}", created_at=at(n)) for n in range(license_keys)
        ],
        "credit_entitlements": [dodo.entitlement("cde_1", created_at=at(0))],
        "balances": [
            dodo.balance("cde_1", "cus_1", balance="115", at=at(10)),
            dodo.balance("cde_1", "cus_2", balance="25", at=at(10)),
        ],
        "ledger": entries,
    }


class TestBackfill:
    def test_an_empty_read_model_is_filled_and_a_second_run_records_nothing(
        self,
        reconcile_env: dict[str, str],
        env: dict[str, str],
        fake: dodo.FakeDodo,
        clean_db: Engine,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        fake.put_state(merchant())
        with celery_worker(env, tmp_path):
            first = run_json(capsys)
            wait_until(lambda: all_final(clean_db), timeout=120, what="events applied")
            second = run_json(capsys)
        families = first["families"]
        assert families["payments"] == {
            "listed": 250,
            "missing": 250,
            "differs": 0,
            "recorded": 250,
            "malformed": 0,
        }
        assert families["subscriptions"]["recorded"] == 120
        assert families["license_keys"]["recorded"] == 110
        assert families["refunds"]["recorded"] == 30
        assert families["disputes"]["recorded"] == 15
        assert families["credits"]["missing"] == 7
        assert count(clean_db, Payment) == 250
        assert count(clean_db, Subscription) == 120
        assert count(clean_db, LicenseKey) == 110
        assert count(clean_db, CreditEntry) == 7
        with Session(clean_db) as session:
            paused = session.get(Subscription, "sub_0000")
            pending = session.get(Refund, "ref_000")
            credits = session.get(CreditBalance, ("cus_1", "cde_1"))
            dead = session.scalar(
                select(func.count())
                .select_from(WebhookEvent)
                .where(WebhookEvent.status != EventStatus.PROCESSED)
            )
        assert paused is not None and paused.status == "paused"
        assert paused.last_event_type == "subscription.paused"
        # No webhook type names a pending refund: its state comes through all the same.
        assert pending is not None and pending.status == "pending"
        assert pending.last_event_type == "refund.reconciled"
        assert pending.data["customer"]["customer_id"] == "cus_1"  # retrieved: the list lacks it
        assert credits is not None and credits.chain_ok and credits.balance == 115
        assert dead == 0
        assert second["totals"]["recorded"] == 0
        assert second["totals"]["missing"] == 0 and second["totals"]["differs"] == 0
        assert count(clean_db, ReconcileRun) == 2

    def test_pages_are_asked_for_from_zero_one_by_one(
        self,
        reconcile_env: dict[str, str],
        fake: dodo.FakeDodo,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """The SDK's own paging would go 0, 2, 3: page 1 must be asked for too."""
        fake.put_state(merchant(payments=250))
        run_json(capsys, "--family", "payments", "--dry-run")
        pages = [r["query"]["page_number"] for r in fake.requests() if r["path"] == "/payments"]
        assert pages == ["0", "1", "2"]

    @pytest.mark.parametrize("order", ["newest_first", "by_id"])
    def test_a_window_over_the_page_cap_is_listed_in_smaller_ones(
        self,
        order: str,
        reconcile_env: dict[str, str],
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """Newest first, the rest is what is older than the oldest seen; in another order,
        the window is split in halves: either way every object is listed once."""
        with dodo.fake_dodo(tmp_path, api_key=API_KEY, max_page=2) as small:
            monkeypatch.setenv("DODO_PAYMENTS_BASE_URL", small.url)
            monkeypatch.setattr("shared.reconcile.MAX_PAGES", 3)
            small.put_state({**merchant(payments=700), "order": order})
            report = run_json(capsys, "--family", "payments", "--dry-run")
            statuses = {r["status"] for r in small.requests()}
        assert report["families"]["payments"]["listed"] == 700
        assert report["families"]["payments"]["missing"] == 700
        assert len({d["id"] for d in report["differences"]}) == 700
        assert statuses == {200}  # never past the cap
        assert report["problems"] == []


class TestCorrections:
    def test_older_local_state_is_corrected_and_newer_local_state_kept(
        self,
        reconcile_env: dict[str, str],
        env: dict[str, str],
        fake: dodo.FakeDodo,
        clean_db: Engine,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        future = datetime.now(UTC) + timedelta(hours=1)
        apply_local(clean_db, "subscription.active", when=at(1), subscription_id="sub_old")
        apply_local(clean_db, "subscription.active", when=future, subscription_id="sub_new")
        fake.put_state(
            {
                "subscriptions": [
                    dodo.subscription("sub_old", created_at=at(0), status="cancelled"),
                    dodo.subscription("sub_new", created_at=at(0), status="on_hold"),
                ]
            }
        )
        with celery_worker(env, tmp_path):
            report = run_json(capsys, "--family", "subscriptions")
            wait_until(lambda: all_final(clean_db), timeout=60, what="events applied")
            again = run_json(capsys, "--family", "subscriptions")
        assert report["families"]["subscriptions"]["differs"] == 2
        assert {d["id"]: d["fields"]["status"] for d in report["differences"]} == {
            "sub_old": {"local": "active", "api": "cancelled"},
            "sub_new": {"local": "active", "api": "on_hold"},
        }
        with Session(clean_db) as session:
            old = session.get(Subscription, "sub_old")
            new = session.get(Subscription, "sub_new")
            outcomes = dict(
                session.execute(select(WebhookEvent.webhook_id, WebhookEvent.outcome)).all()
            )
        assert old is not None and old.status == "cancelled"
        assert old.last_event_type == "subscription.cancelled"
        assert new is not None and new.status == "active"  # the later webhook's state stays
        by_entity = {k.split("_")[3]: v for k, v in outcomes.items() if k.startswith("reconcile_")}
        assert by_entity == {"old": "applied", "new": "superseded"}
        # sub_new still differs, but the same difference is not recorded twice.
        assert again["families"]["subscriptions"]["differs"] == 1
        assert again["families"]["subscriptions"]["recorded"] == 0

    def test_a_ledger_with_a_hole_is_healed(
        self,
        reconcile_env: dict[str, str],
        env: dict[str, str],
        fake: dodo.FakeDodo,
        clean_db: Engine,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        entries = dodo.ledger("cde_1", "cus_1", [100, -10, -20, 50], start=at(0))
        for entry in (entries[0], entries[1], entries[3]):
            event_type = "credit.added" if entry["is_credit"] else "credit.deducted"
            apply_local(clean_db, event_type, when=at(5), **entry)
        with Session(clean_db) as session:
            broken = session.get(CreditBalance, ("cus_1", "cde_1"))
            assert broken is not None and not broken.chain_ok
        fake.put_state(
            {
                "credit_entitlements": [dodo.entitlement("cde_1", created_at=at(0))],
                "balances": [dodo.balance("cde_1", "cus_1", balance="120", at=at(9))],
                "ledger": entries,
            }
        )
        with celery_worker(env, tmp_path):
            report = run_json(capsys, "--family", "credits")
            wait_until(lambda: all_final(clean_db), timeout=60, what="events applied")
            again = run_json(capsys, "--family", "credits")
        assert report["families"]["credits"]["missing"] == 1
        assert [d["id"] for d in report["differences"]] == [entries[2]["id"]]
        with Session(clean_db) as session:
            healed = session.get(CreditBalance, ("cus_1", "cde_1"))
        assert healed is not None and healed.chain_ok and healed.balance == 120
        assert healed.entry_count == 4
        assert again["families"]["credits"] == {
            "listed": 1,
            "missing": 0,
            "differs": 0,
            "recorded": 0,
            "malformed": 0,
        }


class TestRetrieve:
    def test_a_refund_dodo_no_longer_retrieves_is_recorded_as_listed(
        self,
        reconcile_env: dict[str, str],
        fake: dodo.FakeDodo,
        clean_db: Engine,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        state = merchant(payments=0, subscriptions=0, license_keys=0)
        fake.put_state({"refunds": state["refunds"][:3]})
        fake.fail_next({"status": 404, "path": "/refunds/ref_001"})
        report = run_json(capsys, "--family", "refunds")
        assert report["families"]["refunds"]["recorded"] == 3
        with Session(clean_db) as session:
            ids = list(session.scalars(select(WebhookEvent.webhook_id)))
        found = [stored_event(clean_db, webhook_id).body for webhook_id in ids]
        bodies = {
            json.loads(body)["data"]["refund_id"]: json.loads(body)["data"]
            for body in found
            if body is not None
        }
        assert "customer" not in bodies["ref_001"]  # the list's form
        assert bodies["ref_002"]["customer"]["customer_id"] == "cus_1"  # retrieved


class TestDryRun:
    def test_dry_run_shows_the_differences_and_writes_nothing(
        self,
        reconcile_env: dict[str, str],
        fake: dodo.FakeDodo,
        clean_db: Engine,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        apply_local(clean_db, "payment.processing", when=at(1), payment_id="pay_0001")
        fake.put_state(merchant(payments=3, subscriptions=0, license_keys=0))
        before = count(clean_db, WebhookEvent)
        code, out, _ = run(capsys, "--dry-run", "--family", "payments")
        assert code == 0
        assert "payments pay_0000: missing locally" in out
        assert "payments pay_0001: status 'processing' -> 'succeeded'" in out
        assert "dry run: nothing recorded" in out
        assert count(clean_db, WebhookEvent) == before
        assert count(clean_db, ReconcileRun) == 0


class TestBadConditions:
    def test_a_429_and_a_500_on_the_way_are_retried(
        self,
        reconcile_env: dict[str, str],
        fake: dodo.FakeDodo,
        clean_db: Engine,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        fake.put_state(merchant(payments=150, subscriptions=0, license_keys=0))
        fake.fail_next({"status": 429, "retry_after": 1}, {"status": 500})
        report = run_json(capsys, "--family", "payments")
        assert report["families"]["payments"]["recorded"] == 150
        statuses = [r["status"] for r in fake.requests() if r["path"] == "/payments"]
        assert statuses == [429, 500, 200, 200]
        assert count(clean_db, WebhookEvent) == 150

    def test_a_run_stopped_half_way_is_simply_run_again(
        self,
        reconcile_env: dict[str, str],
        fake: dodo.FakeDodo,
        clean_db: Engine,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        monkeypatch.setattr("shared.reconcile.SDK_MAX_RETRIES", 1)
        fake.put_state(merchant(payments=250, subscriptions=0, license_keys=0))
        fake.fail_next(*[{"status": 500, "path": "/payments", "page": "2"}] * 2)
        code, out, err = run(capsys, "--family", "payments")
        assert code == 1 and out == ""
        assert err == "dodo-webhooks: Dodo's API answered 500 to GET /payments: fault\n"
        assert count(clean_db, WebhookEvent) == 200  # the first two pages, committed
        report = run_json(capsys, "--family", "payments")
        assert report["families"]["payments"]["recorded"] == 50
        assert count(clean_db, WebhookEvent) == 250
        with Session(clean_db) as session:
            stopped, finished = session.scalars(select(ReconcileRun).order_by(ReconcileRun.id))
        assert stopped.error is not None and "500" in stopped.error
        assert stopped.recorded == 200 and finished.error is None

    def test_a_wrong_key_is_one_line_and_exit_1(
        self,
        reconcile_env: dict[str, str],
        fake: dodo.FakeDodo,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        monkeypatch.setenv("DODO_PAYMENTS_API_KEY", "not-the-key")
        code, out, err = run(capsys)
        assert code == 1 and out == ""
        assert err.count("\n") == 1 and "Traceback" not in err
        assert "DODO_PAYMENTS_API_KEY" in err and "401" in err

    def test_a_missing_key_is_one_line_and_exit_1(
        self,
        reconcile_env: dict[str, str],
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        monkeypatch.delenv("DODO_PAYMENTS_API_KEY")
        code, _, err = run(capsys)
        assert code == 1
        assert err.startswith("dodo-webhooks: DODO_PAYMENTS_API_KEY is not set")
        assert err.count("\n") == 1

    def test_an_unreachable_api_is_one_line_and_exit_1(
        self,
        reconcile_env: dict[str, str],
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        from tests.support import free_port

        monkeypatch.setenv("DODO_PAYMENTS_BASE_URL", f"http://127.0.0.1:{free_port()}")
        monkeypatch.setattr("shared.reconcile.SDK_MAX_RETRIES", 0)
        code, _, err = run(capsys, "--family", "payments")
        assert code == 1
        assert "cannot reach Dodo's API at http://127.0.0.1:" in err
        assert err.count("\n") == 1 and "Traceback" not in err

    def test_a_malformed_object_is_skipped_counted_and_reported(
        self,
        reconcile_env: dict[str, str],
        fake: dodo.FakeDodo,
        clean_db: Engine,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        state = merchant(payments=3, subscriptions=0, license_keys=0)
        del state["payments"][1]["total_amount"]
        fake.put_state(state)
        code, out, _ = run(capsys, "--family", "payments")
        assert code == 1
        assert "problem: payments: malformed object skipped: pay_0001: total_amount missing" in out
        with Session(clean_db) as session:
            recorded = list(session.scalars(select(WebhookEvent.webhook_id)))
        assert sorted(r.split("_")[3] for r in recorded) == ["0000", "0002"]


class TestPeriodicRun:
    def test_beat_reconciles_every_interval_and_metrics_show_the_last_run(
        self,
        env: dict[str, str],
        fake: dodo.FakeDodo,
        clean_db: Engine,
        tmp_path: Path,
    ) -> None:
        fake.put_state(merchant(payments=120, subscriptions=5, license_keys=5))
        periodic = {
            **env,
            "DODO_PAYMENTS_API_KEY": API_KEY,
            "DODO_PAYMENTS_BASE_URL": fake.url,
            "RECONCILE_INTERVAL_SECONDS": "2",
            "BEAT_SCHEDULE_FILE": str(tmp_path / "beat-schedule"),
        }

        def runs() -> list[ReconcileRun]:
            with Session(clean_db) as session:
                return list(session.scalars(select(ReconcileRun).order_by(ReconcileRun.id)))

        # -B: beat inside the worker, with the schedule `celery -A workers beat` runs.
        with celery_worker(periodic, tmp_path, extra=["-B"]):
            wait_until(lambda: count(clean_db, Payment) == 120, timeout=90, what="payments")
            # Runs while the first run's events are in flight still see them missing.
            wait_until(
                lambda: runs()[-1].missing + runs()[-1].differs == 0,
                timeout=60,
                what="a run that finds nothing to do",
            )
        done = runs()
        assert all(run.trigger == "beat" and run.error is None for run in done)
        assert done[0].counts["payments"]["recorded"] == 120
        assert sum(run.recorded for run in done) == done[0].recorded  # nothing twice
        text = render_metrics(clean_db).decode()
        assert "dodo_webhooks_reconcile_last_run_ok 1.0" in text
        assert 'dodo_webhooks_reconcile_differences{family="payments"} 0.0' in text
        assert "dodo_webhooks_reconcile_last_run_timestamp_seconds" in text

    def test_beat_schedules_no_reconcile_by_default(self) -> None:
        from workers.tasks import app

        assert "reconcile-with-dodo" not in app.conf.beat_schedule


@pytest.mark.slow
class TestAFewThousandObjects:
    def test_a_backfill_of_thousands_stays_within_the_rate_allowed(
        self,
        reconcile_env: dict[str, str],
        env: dict[str, str],
        fake: dodo.FakeDodo,
        clean_db: Engine,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """The figures in the README: calls made, time taken, the highest rate in any second."""
        rate = 20
        monkeypatch.setenv("RECONCILE_REQUESTS_PER_SECOND", str(rate))
        state = merchant(payments=3000, subscriptions=1000, license_keys=500)
        state["refunds"] = [
            dodo.refund(f"ref_{n:04d}", created_at=at(n), payment_id=f"pay_{n:04d}")
            for n in range(300)
        ]
        state["disputes"] = [
            dodo.dispute(f"dis_{n:04d}", created_at=at(n), payment_id=f"pay_{n:04d}")
            for n in range(100)
        ]
        state["balances"] = []
        state["ledger"] = []
        for n in range(50):
            customer = f"cus_c{n:03d}"
            entries = dodo.ledger("cde_1", customer, [100] + [-1] * 19, start=at(n))
            state["ledger"] += entries
            state["balances"].append(dodo.balance("cde_1", customer, balance="81", at=at(30)))
        fake.put_state(state)
        started = time.monotonic()
        report = run_json(capsys)
        elapsed = time.monotonic() - started
        calls = fake.requests()
        times = sorted(r["at"] for r in calls)
        busiest = max(sum(1 for t in times[i:] if t < start + 1.0) for i, start in enumerate(times))
        objects = sum(report["families"][f]["listed"] for f in report["families"])
        figures = (
            f"\nreconcile: {objects} objects listed ({report['totals']['recorded']} events "
            f"recorded), {len(calls)} API calls in {elapsed:.1f} s, at most {busiest} in any "
            f"second (allowed {rate}/s)"
        )
        assert report["totals"]["recorded"] == 3000 + 1000 + 500 + 300 + 100 + 50 * 20
        assert report["api_calls"] == len(calls)
        assert busiest <= rate + 1
        # Pages of 100, a retrieve per refund and dispute, one ledger read per account.
        assert len(calls) <= 31 + 11 + 6 + (4 + 300) + (2 + 100) + (1 + 1 + 50)

        with celery_worker(env, tmp_path):
            started = time.monotonic()
            wait_until(lambda: all_final(clean_db), timeout=300, what="events applied")
            figures += f", applied by one worker (-c 2) in {time.monotonic() - started:.1f} s"
        fake.clear_requests()
        started = time.monotonic()
        again = run_json(capsys)
        elapsed = time.monotonic() - started
        with capsys.disabled():
            print(
                f"{figures}\nreconcile again: {again['totals']['recorded']} recorded, "
                f"{again['api_calls']} API calls in {elapsed:.1f} s"
            )
        assert again["totals"]["recorded"] == 0
        assert again["totals"]["missing"] + again["totals"]["differs"] == 0
        # The list pages only: no retrieve, no ledger (each is complete).
        assert again["api_calls"] == 31 + 11 + 6 + 4 + 2 + 1 + 1


class TestFilters:
    def test_since_and_customer_narrow_what_is_listed(
        self,
        reconcile_env: dict[str, str],
        fake: dodo.FakeDodo,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        fake.put_state(merchant(payments=300, subscriptions=0, license_keys=0))
        since = at(150).isoformat()
        report = run_json(
            capsys, "--family", "payments", "--since", since, "--customer", "cus_2", "--dry-run"
        )
        # Payments 150..299 of customer cus_2 (n % 3 == 1).
        assert report["families"]["payments"]["listed"] == len(
            [n for n in range(150, 300) if n % 3 == 1]
        )
        (first, *_) = [r for r in fake.requests() if r["path"] == "/payments"]
        assert first["query"]["customer_id"] == "cus_2"
        assert datetime.fromisoformat(first["query"]["created_at_gte"]) == at(150)

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["--family", "payments,invoices"], "--family: unknown invoices"),
            (["--since", "last tuesday"], "--since: 'last tuesday' is not an ISO date"),
        ],
    )
    def test_a_bad_flag_is_one_line_and_exit_1(
        self,
        args: list[str],
        message: str,
        reconcile_env: dict[str, str],
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        code, out, err = run(capsys, *args)
        assert code == 1 and out == ""
        assert err.startswith(f"dodo-webhooks: {message}") and err.count("\n") == 1

    def test_the_environment_picks_dodos_url_unless_a_base_url_is_given(
        self, settings: Settings
    ) -> None:
        from shared.reconcile import DodoApi

        test_mode = settings.model_copy(
            update={"dodo_payments_api_key": "k", "dodo_payments_environment": "test_mode"}
        )
        assert DodoApi(test_mode).base_url == "https://test.dodopayments.com"
        live = settings.model_copy(update={"dodo_payments_api_key": "k"})
        assert DodoApi(live).base_url == "https://live.dodopayments.com"
        local = live.model_copy(update={"dodo_payments_base_url": "http://127.0.0.1:9"})
        assert DodoApi(local).base_url == "http://127.0.0.1:9"


class TestOneRunAtATime:
    def test_a_run_while_another_holds_the_lock_is_refused_but_a_dry_run_is_not(
        self,
        reconcile_env: dict[str, str],
        fake: dodo.FakeDodo,
        clean_db: Engine,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        from sqlalchemy import text

        from shared.reconcile import RUN_LOCK_KEY

        fake.put_state(merchant(payments=5, subscriptions=0, license_keys=0))
        with clean_db.connect() as holder:
            holder.execute(text(f"SELECT pg_advisory_lock({RUN_LOCK_KEY})"))
            code, _, err = run(capsys, "--family", "payments")
            dry = run_json(capsys, "--family", "payments", "--dry-run")
            holder.execute(text(f"SELECT pg_advisory_unlock({RUN_LOCK_KEY})"))
            holder.commit()
        assert code == 1 and "another reconciliation is running" in err
        assert dry["families"]["payments"]["missing"] == 5
        assert count(clean_db, WebhookEvent) == 0
        assert run_json(capsys, "--family", "payments")["totals"]["recorded"] == 5


class TestRedisAway:
    def test_events_are_recorded_pending_when_redis_is_away_and_it_is_said(
        self,
        reconcile_env: dict[str, str],
        fake: dodo.FakeDodo,
        clean_db: Engine,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        from tests.support import free_port

        monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
        fake.put_state(merchant(payments=150, subscriptions=0, license_keys=0))
        started = time.monotonic()
        code, out, _ = run(capsys, "--family", "payments")
        assert code == 1
        assert "150 event(s) recorded, 0 queued" in out
        assert "problem: REDIS_URL: could not queue" in out
        assert time.monotonic() - started < 30  # not one connection timeout per event
        with Session(clean_db) as session:
            statuses = set(session.scalars(select(WebhookEvent.status)))
        assert statuses == {EventStatus.PENDING}


class TestQueueing:
    def test_each_page_recorded_wakes_its_queues_drain_once_not_a_task_per_event(
        self,
        reconcile_env: dict[str, str],
        settings: Settings,
        fake: dodo.FakeDodo,
        clean_db: Engine,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """A backfill is a backlog: the drain applies it in batches, as it does deliveries."""
        fake.put_state(merchant(payments=250, subscriptions=0, license_keys=0))
        report = run_json(capsys, "--family", "payments")
        assert report["totals"]["recorded"] == report["queued"] == 250
        # Three pages of at most 100 payments: one drain of the payments queue each.
        assert queued_tasks(settings.redis_url, "payments") == ["workers.drain"] * 3


SDK_STATUSES = {
    "payments": ("dodopayments.types", "IntentStatus"),
    "refunds": ("dodopayments.types", "RefundStatus"),
    "disputes": ("dodopayments.types", "DisputeStatus"),
    "subscriptions": ("dodopayments.types", "SubscriptionStatus"),
    "license_keys": ("dodopayments.types", "LicenseKeyStatus"),
}


def sdk_statuses(family: str) -> tuple[str, ...]:
    import importlib
    from typing import get_args

    module, name = SDK_STATUSES[family]
    return tuple(get_args(getattr(importlib.import_module(module), name)))


class TestSyntheticTypes:
    @pytest.mark.parametrize("family", sorted(SDK_STATUSES))
    def test_every_status_the_sdk_knows_gets_a_type_routed_to_its_kind(self, family: str) -> None:
        from shared.catalog import KIND_OF
        from shared.reconcile import SNAPSHOTS

        spec = SNAPSHOTS[family]
        for status in sdk_statuses(family):
            for missing in (True, False):
                event_type = spec.event_type({spec.status_field: status}, missing=missing)
                assert event_type in ROUTES, (family, status)
                assert KIND_OF[event_type] == spec.kind

    def test_a_status_with_a_webhook_type_is_named_by_it(self) -> None:
        from shared.reconcile import SNAPSHOTS

        def named(family: str, status: str) -> str:
            spec = SNAPSHOTS[family]
            return spec.event_type({spec.status_field: status}, missing=False)

        assert named("payments", "succeeded") == "payment.succeeded"
        assert named("payments", "requires_capture") == "payment.reconciled"
        assert named("refunds", "pending") == "refund.reconciled"
        assert named("disputes", "dispute_won") == "dispute.won"
        assert named("subscriptions", "paused") == "subscription.paused"
        assert named("subscriptions", "pending") == "subscription.reconciled"

    def test_every_ledger_transaction_type_gets_a_credit_entry_type(self) -> None:
        from typing import get_args

        from dodopayments.types.credit_entitlements import CreditLedgerEntry

        from shared.catalog import KIND_OF
        from shared.reconcile import CREDIT_TYPES

        kinds = get_args(CreditLedgerEntry.model_fields["transaction_type"].annotation)
        for kind in kinds:
            event_type = CREDIT_TYPES.get(kind, "credit.reconciled")
            assert KIND_OF[event_type] == "credit_entry", kind


class TestSyntheticEventIds:
    def test_the_same_state_and_held_event_give_the_same_id_and_a_change_another(self) -> None:
        from shared.reconcile import synthetic_event

        def webhook_id(status: str, basis: str, **extra: Any) -> str:
            obj = {"payment_id": "pay_1", "status": status, **extra}
            state = {"payment_id": "pay_1", "status": status}
            event = synthetic_event(
                "payment",
                "pay_1",
                "payment.succeeded",
                obj,
                datetime.now(UTC),
                state=state,
                basis=basis,
            )
            return event.webhook_id

        first = webhook_id("succeeded", "msg_1")
        assert first.startswith("reconcile_payment_pay_1_")
        assert webhook_id("succeeded", "msg_1", invoice_url="changes each time") == first
        assert webhook_id("failed", "msg_1") != first
        assert webhook_id("succeeded", "msg_2") != first

    def test_an_id_too_long_for_the_column_is_hashed(self) -> None:
        from shared.reconcile import synthetic_event

        long_id = "pay_" + "x" * 300
        event = synthetic_event(
            "payment", long_id, "payment.succeeded", {}, datetime.now(UTC), state={}, basis=""
        )
        assert len(event.webhook_id) <= 255 and event.webhook_id.startswith("reconcile_")

    def test_the_event_is_stamped_with_the_time_given_and_carries_the_object(self) -> None:
        from shared.reconcile import synthetic_event

        when = datetime(2026, 5, 1, 9, 30, tzinfo=UTC)
        obj = {"refund_id": "ref_1", "status": "pending", "business_id": "bus_9"}
        event = synthetic_event(
            "refund", "ref_1", "refund.reconciled", obj, when, state=obj, basis=""
        )
        envelope = json.loads(event.body)
        assert envelope == {
            "business_id": "bus_9",
            "type": "refund.reconciled",
            "timestamp": when.isoformat(),
            "data": obj,
        }
        assert event.event_at == when


class TestSyntheticEventSubjects:
    """A synthetic event is recorded with its customer and payment, as the ingest records a
    delivery's: the erasure finds it by index."""

    def test_a_payment_and_a_dispute_carry_what_the_ingest_would_record(
        self, clean_db: Engine
    ) -> None:
        from shared.lifecycle import find_scope
        from shared.reconcile import record_events, synthetic_event

        when = datetime(2026, 5, 1, 9, 30, tzinfo=UTC)
        payment = {"payment_id": "pay_9", "customer": {"customer_id": "cus_9"}, "status": "x"}
        dispute = {"dispute_id": "dis_9", "payment_id": "pay_9", "dispute_status": "y"}
        events = [
            synthetic_event(kind, oid, etype, obj, when, state=obj, basis="")
            for kind, oid, etype, obj in (
                ("payment", "pay_9", "payment.reconciled", payment),
                ("dispute", "dis_9", "dispute.reconciled", dispute),
            )
        ]
        factory = make_sessionmaker(clean_db)
        with factory.begin() as session:
            assert record_events(session, events) == events
        with factory() as session:
            rows = session.execute(
                select(WebhookEvent.type, WebhookEvent.customer_id, WebhookEvent.payment_id)
            ).all()
            assert sorted(tuple(r) for r in rows) == [
                ("dispute.reconciled", None, "pay_9"),
                ("payment.reconciled", "cus_9", "pay_9"),
            ]
            scope = find_scope(session, "cus_9")
        assert scope.webhook_ids == {e.webhook_id for e in events}
