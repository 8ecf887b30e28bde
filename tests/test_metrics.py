"""GET /metrics: the ingest's counters, and the pipeline's state read from the database."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import requests
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, text, update

from ingest import create_app
from ingest.metrics import DB_QUERY_TIMEOUT_MS
from ingest.recording import record_delivery
from shared.models import EventStatus, WebhookEvent
from shared.settings import Settings
from tests.support import celery_worker, envelope, free_port, gunicorn, signed_headers, wait_until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of `name` whose labels include `labels`."""
    return sum(
        v for (n, got), v in samples.items() if n == name and set(labels.items()) <= set(got)
    )


@contextmanager
def ingest_client(settings: Settings) -> Iterator[FlaskClient]:
    """An in-process ingest whose database and Redis connections are closed afterwards.

    The start-up reachability check is off: some tests scrape with the database away.
    """
    app = create_app(settings, check_connections=False)
    try:
        yield app.test_client()
    finally:
        app.extensions["dodo"].close()


def scrape(client: FlaskClient) -> Samples:
    answer = client.get("/metrics")
    assert answer.status_code == 200
    assert answer.mimetype == "text/plain"
    return parse(answer.get_data(as_text=True))


def post_event(client: FlaskClient, event_type: str, webhook_id: str) -> int:
    body = envelope(event_type, {"payment_id": "pay_1"}, timestamp=datetime.now(UTC))
    return client.post(
        "/webhooks/dodo", data=body, headers=signed_headers(body, webhook_id=webhook_id)
    ).status_code


def record(engine: Engine, webhook_id: str, event_type: str) -> None:
    record_delivery(
        engine,
        webhook_id=webhook_id,
        webhook_ts=int(datetime.now(UTC).timestamp()),
        headers={},
        body=b"{}",
        event_type=event_type,
        event_at=datetime.now(UTC),
    )


class TestIngestCounters:
    def test_received_rejected_duplicates_and_queued_move_with_deliveries(
        self, settings: Settings
    ) -> None:
        with ingest_client(settings) as client:
            before = scrape(client)
            webhook_id = f"msg_{uuid.uuid4().hex}"
            assert post_event(client, "payment.succeeded", webhook_id) == 202
            assert post_event(client, "payment.succeeded", webhook_id) == 200
            assert client.post("/webhooks/dodo", data=b"{}").status_code == 401
            after = scrape(client)

        def delta(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        assert delta("dodo_webhooks_received_total") == 3
        assert delta("dodo_webhooks_duplicates_total") == 1
        assert delta("dodo_webhooks_queued_total") == 1
        assert delta("dodo_webhooks_rejected_total", reason="401") == 1

    def test_oversized_body_counts_as_rejected_413(self, settings: Settings) -> None:
        with ingest_client(settings) as client:
            before = value(scrape(client), "dodo_webhooks_rejected_total", reason="413")
            big = b"x" * (settings.max_body_bytes + 1)
            assert client.post("/webhooks/dodo", data=big).status_code == 413
            after = value(scrape(client), "dodo_webhooks_rejected_total", reason="413")
        assert after - before == 1

    def test_many_apps_in_one_process_share_one_set_of_counters(self, settings: Settings) -> None:
        """The default registry refuses a name twice; creating apps again must not trip it."""
        for _ in range(3):
            with ingest_client(settings) as client:
                assert client.get("/metrics").status_code == 200


class TestDatabaseSeries:
    def test_processed_retries_dead_and_backlog_come_from_the_event_table(
        self, settings: Settings, clean_db: Engine
    ) -> None:
        for webhook_id, event_type in [
            ("msg_applied", "payment.succeeded"),
            ("msg_superseded", "payment.succeeded"),
            ("msg_ignored", "payout.created"),
            ("msg_dead", "refund.failed"),
            ("msg_retrying", "refund.failed"),
            ("msg_pending", "dispute.opened"),
        ]:
            record(clean_db, webhook_id, event_type)
        finals = {
            "msg_applied": dict(status=EventStatus.PROCESSED, outcome="applied", attempts=1),
            "msg_superseded": dict(status=EventStatus.PROCESSED, outcome="superseded", attempts=3),
            "msg_ignored": dict(status=EventStatus.IGNORED, attempts=1),
            "msg_dead": dict(status=EventStatus.DEAD, attempts=8),
            "msg_retrying": dict(status=EventStatus.RETRYING, attempts=2),
        }
        with clean_db.begin() as conn:
            for webhook_id, values in finals.items():
                conn.execute(
                    update(WebhookEvent)
                    .where(WebhookEvent.webhook_id == webhook_id)
                    .values(**values)
                )
        with ingest_client(settings) as client:
            samples = scrape(client)

        assert value(samples, "dodo_webhooks_metrics_db_up") == 1
        processed = "dodo_webhooks_processed_total"
        assert value(samples, processed, type="payment.succeeded", outcome="applied") == 1
        assert value(samples, processed, type="payment.succeeded", outcome="superseded") == 1
        assert value(samples, processed, type="payout.created", outcome="ignored") == 1
        assert value(samples, "dodo_webhooks_retries_total", type="payment.succeeded") == 2
        assert value(samples, "dodo_webhooks_retries_total", type="refund.failed") == 7 + 1
        assert value(samples, "dodo_webhooks_dead", type="refund.failed") == 1
        assert value(samples, "dodo_webhooks_events", status="retrying") == 1
        assert value(samples, "dodo_webhooks_pending") == 2
        assert value(samples, "dodo_webhooks_oldest_pending_age_seconds") > 0

    def test_empty_table_gives_zero_backlog(self, settings: Settings, clean_db: Engine) -> None:
        with ingest_client(settings) as client:
            samples = scrape(client)
        assert value(samples, "dodo_webhooks_pending") == 0
        assert value(samples, "dodo_webhooks_oldest_pending_age_seconds") == 0

    def test_unreachable_database_answers_with_db_up_0_not_an_error(
        self, settings: Settings
    ) -> None:
        down = settings.model_copy(
            update={"database_url": f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x"}
        )
        with ingest_client(down) as client:
            samples = scrape(client)
        assert value(samples, "dodo_webhooks_metrics_db_up") == 0
        assert ("dodo_webhooks_received_total", ()) in samples
        assert not total(samples, "dodo_webhooks_events")

    def test_a_locked_table_gives_db_up_0_within_the_timeout_not_a_hung_scrape(
        self, settings: Settings, clean_db: Engine
    ) -> None:
        with clean_db.connect() as locker, locker.begin():
            locker.execute(text("LOCK TABLE webhook_events IN ACCESS EXCLUSIVE MODE"))
            with ingest_client(settings) as client:
                started = time.monotonic()
                samples = scrape(client)
                took = time.monotonic() - started
        assert value(samples, "dodo_webhooks_metrics_db_up") == 0
        assert DB_QUERY_TIMEOUT_MS / 1000 <= took < DB_QUERY_TIMEOUT_MS / 1000 + 3


class TestMetricsUnderGunicorn:
    def test_counters_add_up_across_workers_and_backlog_drains_when_a_worker_runs(
        self, env: dict[str, str], tmp_path: Path
    ) -> None:
        """Two gunicorn workers in multiprocess mode; pending is non-zero until a worker runs."""
        multiproc = tmp_path / "prometheus"
        multiproc.mkdir()
        env = {**env, "PROMETHEUS_MULTIPROC_DIR": str(multiproc)}
        with gunicorn(env, tmp_path, workers=2) as url:
            for n in range(3):
                body = envelope(
                    "payout.created", {"payout_id": f"po_{n}"}, timestamp="2026-01-01T00:00:00Z"
                )
                headers = signed_headers(body, webhook_id=f"msg_m{n}")
                assert requests.post(f"{url}/webhooks/dodo", data=body, headers=headers).ok
            assert requests.post(f"{url}/webhooks/dodo", data=body, headers=headers).ok
            assert requests.post(f"{url}/webhooks/dodo", data="{}").status_code == 401

            # Each scrape lands on either worker: every one must tell the same totals.
            for _ in range(4):
                samples = parse(requests.get(f"{url}/metrics", timeout=10).text)
                assert value(samples, "dodo_webhooks_received_total") == 5
                assert value(samples, "dodo_webhooks_queued_total") == 3
                assert value(samples, "dodo_webhooks_duplicates_total") == 1
                assert value(samples, "dodo_webhooks_rejected_total", reason="401") == 1
            assert value(samples, "dodo_webhooks_pending") == 3
            assert value(samples, "dodo_webhooks_oldest_pending_age_seconds") > 0

            with celery_worker(env, tmp_path):

                def drained() -> Samples | None:
                    samples = parse(requests.get(f"{url}/metrics", timeout=10).text)
                    return samples if value(samples, "dodo_webhooks_pending") == 0 else None

                samples = wait_until(drained, timeout=60, what="the backlog to drain")
            assert value(samples, "dodo_webhooks_oldest_pending_age_seconds") == 0
            assert total(samples, "dodo_webhooks_processed_total", type="payout.created") == 3
