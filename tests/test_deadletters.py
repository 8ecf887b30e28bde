"""Dead letters: shared/deadletters.py and the admin API over it, against real PostgreSQL/Redis."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient
from sqlalchemy import Engine

from ingest import create_app
from shared.deadletters import FilterError, glob_to_like, make_filter, parse_limit, parse_when
from shared.models import EventStatus, WebhookEvent
from shared.queue import enqueue, make_celery
from shared.settings import Settings
from tests.dead_letter_support import (
    COUNT,
    counter,
    event_row,
    hours_ago,
    make_counter,
    queued,
    queued_tasks,
    routes_worker,
    store_event,
    wait_for_status,
)
from tests.support import ADMIN_TOKEN, free_port, wait_until

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def client(settings: Settings) -> Iterator[FlaskClient]:
    app = create_app(settings)
    yield app.test_client()
    app.extensions["dodo"].close()


class TestFilters:
    """The filter parsing both the API and the CLI use."""

    def test_glob_wildcards_become_like_wildcards_and_like_wildcards_stay_literal(self) -> None:
        assert glob_to_like("subscription.*") == "subscription.%"
        assert glob_to_like("dispute.?on") == "dispute._on"
        assert glob_to_like("a_b%c\\") == "a\\_b\\%c\\\\"

    def test_iso_times_dates_and_ages_are_accepted_as_utc(self) -> None:
        assert parse_when("2026-01-31T12:00:00Z", name="since") == datetime(
            2026, 1, 31, 12, tzinfo=UTC
        )
        assert parse_when("2026-01-31T13:00:00+01:00", name="since") == datetime(
            2026, 1, 31, 12, tzinfo=UTC
        )
        assert parse_when("2026-01-31", name="since") == datetime(2026, 1, 31, tzinfo=UTC)
        assert parse_when("2026-01-31T12:00:00", name="since") == datetime(
            2026, 1, 31, 12, tzinfo=UTC
        )
        two_hours = parse_when("2h", name="since")
        assert two_hours is not None
        assert abs((two_hours - hours_ago(2)).total_seconds()) < 5

    @pytest.mark.parametrize("value", ["yesterday", "2026-13-01", "12", "2h ago", ""])
    def test_unparseable_time_is_a_filter_error_naming_the_field(self, value: str) -> None:
        with pytest.raises(FilterError, match=r"^until: "):
            parse_when(value, name="until")

    @pytest.mark.parametrize("value", ["ten", "0", "-1", "1001", "1.5", True])
    def test_limit_outside_1_to_1000_is_a_filter_error(self, value: object) -> None:
        with pytest.raises(FilterError, match=r"^limit: "):
            parse_limit(value)

    def test_since_after_until_is_a_filter_error(self) -> None:
        with pytest.raises(FilterError, match="not before until"):
            make_filter(since="2026-02-01", until="2026-01-01")

    @pytest.mark.parametrize("ids", ["msg_1", [""], [1], {"msg_1": 1}, []])
    def test_ids_must_be_a_non_empty_list_of_strings(self, ids: Any) -> None:
        with pytest.raises(FilterError, match=r"^ids: "):
            make_filter(ids=ids)


class TestListDeadLetters:
    def test_lists_only_dead_events_newest_received_first(
        self, client: FlaskClient, clean_db: Engine
    ) -> None:
        store_event(clean_db, "msg_old", "payment.failed", received_at=hours_ago(3))
        store_event(clean_db, "msg_new", "refund.failed", received_at=hours_ago(1))
        store_event(clean_db, "msg_fine", "payment.succeeded", status=EventStatus.PROCESSED)
        answer = client.get("/api/dead-letters", headers=AUTH)
        assert answer.status_code == 200
        assert [e["webhook_id"] for e in answer.json] == ["msg_new", "msg_old"]
        assert answer.headers["X-Total-Count"] == "2"
        first = answer.json[0]
        assert set(first) == {
            "webhook_id",
            "type",
            "status",
            "outcome",
            "attempts",
            "last_error",
            "received_at",
            "processed_at",
        }
        assert (first["status"], first["attempts"], first["last_error"]) == (
            "dead",
            3,
            "RuntimeError: boom",
        )

    def test_type_glob_matches_a_family_and_treats_sql_wildcards_literally(
        self, client: FlaskClient, clean_db: Engine
    ) -> None:
        for webhook_id, event_type in [
            ("msg_1", "subscription.on_hold"),
            ("msg_2", "subscription.renewed"),
            ("msg_3", "payment.failed"),
            ("msg_4", "odd_type"),
            ("msg_5", "oddXtype"),
        ]:
            store_event(clean_db, webhook_id, event_type)

        def ids(glob: str) -> list[str]:
            answer = client.get("/api/dead-letters", query_string={"type": glob}, headers=AUTH)
            assert answer.status_code == 200, answer.json
            return sorted(e["webhook_id"] for e in answer.json)

        assert ids("subscription.*") == ["msg_1", "msg_2"]
        assert ids("payment.failed") == ["msg_3"]
        assert ids("odd_type") == ["msg_4"]
        assert ids("odd?type") == ["msg_4", "msg_5"]
        assert ids("%") == []
        assert ids("*") == ["msg_1", "msg_2", "msg_3", "msg_4", "msg_5"]

    def test_since_is_inclusive_and_until_exclusive_on_received_at(
        self, client: FlaskClient, clean_db: Engine
    ) -> None:
        store_event(
            clean_db, "msg_jan", "payment.failed", received_at=datetime(2026, 1, 5, tzinfo=UTC)
        )
        store_event(
            clean_db, "msg_feb", "payment.failed", received_at=datetime(2026, 2, 1, tzinfo=UTC)
        )
        store_event(clean_db, "msg_now", "payment.failed", received_at=hours_ago(1))

        def ids(**query: str) -> list[str]:
            answer = client.get("/api/dead-letters", query_string=query, headers=AUTH)
            assert answer.status_code == 200, answer.json
            return sorted(e["webhook_id"] for e in answer.json)

        assert ids(since="2026-02-01") == ["msg_feb", "msg_now"]
        assert ids(until="2026-02-01T00:00:00Z") == ["msg_jan"]
        assert ids(since="2026-01-01", until="2026-03-01") == ["msg_feb", "msg_jan"]
        assert ids(since="2h") == ["msg_now"]

    def test_limit_caps_the_list_and_the_total_count_says_how_many_match(
        self, client: FlaskClient, clean_db: Engine
    ) -> None:
        for n in range(5):
            store_event(clean_db, f"msg_{n}", "payment.failed", received_at=hours_ago(5 - n))
        answer = client.get("/api/dead-letters?limit=2", headers=AUTH)
        assert [e["webhook_id"] for e in answer.json] == ["msg_4", "msg_3"]
        assert answer.headers["X-Total-Count"] == "5"

    def test_ids_filter_selects_those_dead_letters(
        self, client: FlaskClient, clean_db: Engine
    ) -> None:
        for n in range(3):
            store_event(clean_db, f"msg_{n}", "payment.failed")
        answer = client.get("/api/dead-letters?ids=msg_0,msg_2&ids=msg_9", headers=AUTH)
        assert sorted(e["webhook_id"] for e in answer.json) == ["msg_0", "msg_2"]

    @pytest.mark.parametrize(
        ("query", "message"),
        [
            ({"since": "last tuesday"}, "since: "),
            ({"until": "2026-02-30"}, "until: "),
            ({"limit": "ten"}, "limit: "),
            ({"limit": "0"}, "limit: "),
            ({"since": "2026-02-01", "until": "2026-01-01"}, "not before until"),
        ],
    )
    def test_bad_filter_is_a_400_with_the_reason(
        self, client: FlaskClient, query: dict[str, str], message: str
    ) -> None:
        answer = client.get("/api/dead-letters", query_string=query, headers=AUTH)
        assert answer.status_code == 400
        assert message in answer.json["error"]

    def test_returns_401_without_the_bearer_token(self, client: FlaskClient) -> None:
        assert client.get("/api/dead-letters").status_code == 401
        assert client.get("/api/dead-letters/msg_1").status_code == 401
        answer = client.post("/api/dead-letters/retry", json={"all": True})
        assert answer.status_code == 401


class TestShowDeadLetter:
    def test_shows_the_raw_body_and_signed_headers(
        self, client: FlaskClient, clean_db: Engine
    ) -> None:
        store_event(clean_db, "msg_1", "payment.failed", data={"payment_id": "pay_1"})
        answer = client.get("/api/dead-letters/msg_1", headers=AUTH)
        assert answer.status_code == 200
        assert answer.json["webhook_id"] == "msg_1"
        assert '"payment_id": "pay_1"' in answer.json["body"]
        assert answer.json["headers"]["webhook-id"] == "msg_1"
        assert answer.json["event_at"] == "2026-01-01T00:00:00+00:00"

    def test_returns_404_for_an_unknown_or_not_dead_event(
        self, client: FlaskClient, clean_db: Engine
    ) -> None:
        store_event(clean_db, "msg_ok", "payment.failed", status=EventStatus.PROCESSED)
        assert client.get("/api/dead-letters/msg_ok", headers=AUTH).status_code == 404
        answer = client.get("/api/dead-letters/msg_none", headers=AUTH)
        assert answer.status_code == 404
        assert answer.json == {"error": "dead letter 'msg_none' not found"}


class TestRetryDeadLetters:
    def test_dry_run_counts_matches_and_changes_nothing(
        self, client: FlaskClient, clean_db: Engine, settings: Settings
    ) -> None:
        store_event(clean_db, "msg_1", "subscription.on_hold")
        store_event(clean_db, "msg_2", "subscription.renewed")
        store_event(clean_db, "msg_3", "payment.failed")
        before = [snapshot(event_row(clean_db, i)) for i in ("msg_1", "msg_2", "msg_3")]
        answer = client.post(
            "/api/dead-letters/retry",
            json={"type": "subscription.*", "dry_run": True},
            headers=AUTH,
        )
        assert answer.status_code == 200
        assert answer.json == {"matched": 2, "requeued": 0, "queued": 0, "dry_run": True}
        after = [snapshot(event_row(clean_db, i)) for i in ("msg_1", "msg_2", "msg_3")]
        assert after == before
        assert queued(settings.redis_url, "subscriptions") == 0

    def test_retry_sets_pending_with_fresh_attempts_keeps_the_error_and_queues(
        self, client: FlaskClient, clean_db: Engine, settings: Settings
    ) -> None:
        store_event(clean_db, "msg_1", "payment.failed", last_error="OperationalError: db gone")
        store_event(clean_db, "msg_2", "refund.failed")
        answer = client.post("/api/dead-letters/retry", json={"ids": ["msg_1"]}, headers=AUTH)
        assert answer.status_code == 200
        assert answer.json == {"matched": 1, "requeued": 1, "queued": 1, "dry_run": False}
        row = event_row(clean_db, "msg_1")
        assert (row.status, row.attempts, row.last_error) == (
            "pending",
            0,
            "OperationalError: db gone",
        )
        assert (row.processed_at, row.lease_expires_at, row.next_attempt_at) == (None, None, None)
        assert event_row(clean_db, "msg_2").status == "dead"
        assert queued_tasks(settings.redis_url, "payments") == ["workers.drain"]

    def test_retry_with_redis_away_leaves_events_pending_for_the_redrive_and_says_so(
        self, settings: Settings, clean_db: Engine
    ) -> None:
        away = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
        app = create_app(away, check_connections=False)
        store_event(clean_db, "msg_1", "payment.failed")
        answer = app.test_client().post(
            "/api/dead-letters/retry", json={"ids": ["msg_1"]}, headers=AUTH
        )
        app.extensions["dodo"].close()
        assert answer.status_code == 200
        assert (answer.json["requeued"], answer.json["queued"]) == (1, 0)
        [note] = answer.json["notes"]
        assert note.startswith(
            "1 event(s) are pending but could not be queued (Redis (REDIS_URL): "
        )
        assert "re-drive" in note
        assert event_row(clean_db, "msg_1").status == "pending"

    def test_retry_without_any_filter_needs_all_true(
        self, client: FlaskClient, clean_db: Engine
    ) -> None:
        store_event(clean_db, "msg_1", "payment.failed")
        for body in (None, {}, {"dry_run": True}):
            answer = client.post("/api/dead-letters/retry", json=body, headers=AUTH)
            assert answer.status_code == 400
            assert '{"all": true}' in answer.json["error"]
        assert event_row(clean_db, "msg_1").status == "dead"
        answer = client.post("/api/dead-letters/retry", json={"all": True}, headers=AUTH)
        assert answer.json["requeued"] == 1

    @pytest.mark.parametrize(
        ("body", "message"),
        [
            ("[1, 2]", "JSON object"),
            ("not json", "JSON object"),
            ('{"ids": "msg_1"}', "ids: "),
            ('{"typ": "payment.*"}', "unknown field(s): typ"),
            ('{"type": "payment.*", "dry_run": "yes"}', "true or false"),
            ('{"since": "soon"}', "since: "),
            ('{"type": ""}', "type: "),
        ],
    )
    def test_bad_body_is_a_400_and_changes_nothing(
        self, client: FlaskClient, clean_db: Engine, body: str, message: str
    ) -> None:
        store_event(clean_db, "msg_1", "payment.failed")
        answer = client.post(
            "/api/dead-letters/retry",
            data=body,
            headers={**AUTH, "Content-Type": "application/json"},
        )
        assert answer.status_code == 400
        assert message in answer.json["error"]
        assert event_row(clean_db, "msg_1").status == "dead"

    def test_invalid_envelope_is_retried_with_a_warning_and_goes_dead_again(
        self, client: FlaskClient, clean_db: Engine, env: dict[str, str], tmp_path: Path
    ) -> None:
        reason = "invalid event: type: Field required"
        store_event(clean_db, "msg_bad", None, body='{"hello": "world"}', last_error=reason)
        answer = client.post("/api/dead-letters/retry", json={"ids": ["msg_bad"]}, headers=AUTH)
        assert answer.json["requeued"] == 1
        assert "no valid event envelope" in answer.json["notes"][0]
        with routes_worker(env, tmp_path):
            row = wait_for_status(clean_db, "msg_bad", "dead", "processed", "ignored")
        assert (row.status, row.attempts) == ("dead", 1)
        assert row.last_error is not None
        assert row.last_error.startswith("invalid event: ")
        assert "type: Field required" in row.last_error

    def test_retried_events_are_processed_or_ignored_by_a_real_worker(
        self, client: FlaskClient, clean_db: Engine, env: dict[str, str], tmp_path: Path
    ) -> None:
        make_counter(clean_db, "cus_1")
        store_event(clean_db, "msg_count", COUNT, data={"customer_id": "cus_1"})
        store_event(clean_db, "msg_payout", "payout.created", data={"payout_id": "po_1"})
        with routes_worker(env, tmp_path):
            answer = client.post("/api/dead-letters/retry", json={"all": True}, headers=AUTH)
            assert answer.json["requeued"] == 2
            counted = wait_for_status(clean_db, "msg_count", "processed", "dead")
            ignored = wait_for_status(clean_db, "msg_payout", "ignored", "dead")
        assert (counted.status, counted.outcome, counted.attempts) == ("processed", "applied", 1)
        assert counted.last_error is None
        assert (ignored.status, ignored.attempts) == ("ignored", 1)
        assert counter(clean_db, "cus_1") == 1
        assert client.get("/api/dead-letters", headers=AUTH).json == []

    def test_retrying_the_same_event_concurrently_and_again_applies_it_once(
        self,
        client: FlaskClient,
        clean_db: Engine,
        settings: Settings,
        env: dict[str, str],
        tmp_path: Path,
    ) -> None:
        """Concurrent retries requeue it once; extra work signals lose the claim."""
        make_counter(clean_db, "cus_1")
        store_event(clean_db, "msg_1", COUNT, data={"customer_id": "cus_1"})
        app = client.application
        answers: list[dict[str, Any]] = []
        start = threading.Barrier(4)

        def retry() -> None:
            with app.test_client() as own:
                start.wait()
                answer = own.post("/api/dead-letters/retry", json={"ids": ["msg_1"]}, headers=AUTH)
                answers.append(answer.json)

        threads = [threading.Thread(target=retry) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert sorted(a["requeued"] for a in answers) == [0, 0, 0, 1]
        # Duplicate work signals, as a re-drive or a redelivery would send them.
        celery = make_celery(settings)
        for _ in range(3):
            enqueue(celery, "msg_1", COUNT)
        with routes_worker(env, tmp_path, concurrency=4):
            wait_for_status(clean_db, "msg_1", "processed", "dead")
            # A retry in a row: no longer dead, so nothing matches.
            again = client.post("/api/dead-letters/retry", json={"ids": ["msg_1"]}, headers=AUTH)
            assert again.json["matched"] == 0
            enqueue(celery, "msg_1", COUNT)
            wait_for_queue_empty(settings.redis_url)
        celery.close()
        row = event_row(clean_db, "msg_1")
        assert (row.status, row.attempts) == ("processed", 1)
        assert counter(clean_db, "cus_1") == 1


def snapshot(row: WebhookEvent) -> dict[str, Any]:
    return {column.key: getattr(row, column.key) for column in WebhookEvent.__table__.columns}


def wait_for_queue_empty(redis_url: str) -> None:
    wait_until(
        lambda: queued(redis_url, "other") == 0 and unacked(redis_url) == 0,
        timeout=20,
        what="the worker to consume every message",
    )


def unacked(redis_url: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.hlen("unacked"))
    finally:
        client.close()
