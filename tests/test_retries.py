"""The retry policy of workers/tasks.py, run by a real prefork worker with embedded beat."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import redis
import sqlalchemy.exc
from celery import Celery
from sqlalchemy import Engine, create_engine, text

from cli.samples import sample_event
from shared.db import make_sessionmaker, transaction, utcnow
from shared.envelope import EnvelopeError
from shared.models import Base, EventStatus, Outcome
from shared.queue import enqueue, make_celery
from shared.settings import load_settings
from tests.dead_letter_support import (
    COUNT,
    FAST_RETRIES,
    FLAKY,
    POISON,
    counter,
    event_row,
    make_counter,
    routes_worker,
    store_event,
    wait_for_status,
)
from tests.support import ManagedProcess, service_env, wait_until
from workers.claims import LostClaim, apply_event, claim_event
from workers.retry import Failure, backoff_seconds, classify
from workers.schemas import EventValidationError

MAX_ATTEMPTS = int(FAST_RETRIES["MAX_ATTEMPTS"])
FINAL = ("processed", "ignored", "dead")


@dataclass
class Pipeline:
    engine: Engine
    celery: Celery
    worker: ManagedProcess

    def steps(self, webhook_id: str) -> list[str]:
        """The worker's log steps for one event, in order."""
        found = []
        for line in self.worker.output().splitlines():
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            if record.get("webhook_id") == webhook_id and "step" in record:
                found.append(record["step"])
        return found


@pytest.fixture(scope="module")
def pipeline(
    pg_url: str, pg_engine: Engine, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    """One worker for the module (it takes seconds to start): MAX_ATTEMPTS=3, tiny backoff,
    and beat re-driving every half second what has not moved for a second."""
    names = ", ".join(t.name for t in Base.metadata.sorted_tables)
    with pg_engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {names}"))
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    client.close()
    log_dir = tmp_path_factory.mktemp("retries")
    env = service_env(
        pg_url,
        redis_url,
        **FAST_RETRIES,
        REDRIVE_INTERVAL_SECONDS="0.5",
        REDRIVE_AFTER_SECONDS="1",
    )
    celery = make_celery(load_settings(database_url=pg_url, redis_url=redis_url, _env_file=None))
    extra = ["-B", "-s", str(log_dir / "beat-schedule")]
    with routes_worker(env, log_dir, concurrency=2, extra=extra) as worker:
        yield Pipeline(pg_engine, celery, worker)
    celery.close()


def new_id() -> str:
    return f"msg_{uuid.uuid4().hex[:12]}"


def send(pipeline: Pipeline, webhook_id: str, event_type: str, **data: object) -> None:
    """Record the event pending and queue it, as the ingest does."""
    store_event(
        pipeline.engine,
        webhook_id,
        event_type,
        data=data,
        status=EventStatus.PENDING,
        attempts=0,
        last_error=None,
        enqueued_at=utcnow(),
    )
    enqueue(pipeline.celery, webhook_id, event_type)


class TestPoisonEvent:
    def test_ends_dead_after_exactly_max_attempts_with_its_error(self, pipeline: Pipeline) -> None:
        webhook_id = new_id()
        send(pipeline, webhook_id, POISON, customer_id="cus_p")
        row = wait_for_status(pipeline.engine, webhook_id, *FINAL)
        assert (row.status, row.attempts) == ("dead", MAX_ATTEMPTS)
        assert row.last_error == "RuntimeError: poison: this handler always fails"
        assert row.processed_at is not None
        assert pipeline.steps(webhook_id) == ["processing", "retry"] * (MAX_ATTEMPTS - 1) + [
            "processing",
            "dead",
        ]

    def test_dead_event_is_not_retried_again_by_the_redrive(self, pipeline: Pipeline) -> None:
        webhook_id = new_id()
        send(pipeline, webhook_id, POISON, customer_id="cus_p")
        wait_for_status(pipeline.engine, webhook_id, *FINAL)
        # Four re-drive ticks later, nothing has moved.
        enqueue(pipeline.celery, webhook_id, POISON)
        wait_until(lambda: pipeline.steps(webhook_id).count("dead") == 1, timeout=5)
        time.sleep(2)
        assert event_row(pipeline.engine, webhook_id).attempts == MAX_ATTEMPTS
        assert pipeline.steps(webhook_id).count("processing") == MAX_ATTEMPTS


class TestValidationFailure:
    def test_is_dead_at_once_after_one_attempt(self, pipeline: Pipeline) -> None:
        webhook_id = new_id()
        send(pipeline, webhook_id, COUNT, wrong_field="x")
        row = wait_for_status(pipeline.engine, webhook_id, *FINAL)
        assert (row.status, row.attempts) == ("dead", 1)
        assert row.last_error == "invalid event: data.customer_id: Field required"
        assert pipeline.steps(webhook_id) == ["processing", "dead"]


class TestTransientFailure:
    def test_is_retried_with_backoff_and_applied_once_when_it_clears(
        self, pipeline: Pipeline
    ) -> None:
        make_counter(pipeline.engine, "cus_flaky")
        webhook_id = new_id()
        send(pipeline, webhook_id, FLAKY, customer_id="cus_flaky", fail_times=MAX_ATTEMPTS - 1)
        row = wait_for_status(pipeline.engine, webhook_id, *FINAL)
        assert (row.status, row.outcome, row.attempts) == ("processed", "applied", MAX_ATTEMPTS)
        assert row.last_error is None
        assert counter(pipeline.engine, "cus_flaky") == 1


class TestRedrive:
    """Beat's re-drive queues what is recorded but not moving, and the claim keeps it single."""

    def test_pending_retrying_and_expired_lease_events_are_finished(
        self, pipeline: Pipeline
    ) -> None:
        long_ago = utcnow() - timedelta(minutes=5)
        ids = {state: new_id() for state in ("pending", "retrying", "processing")}
        for webhook_id in ids.values():
            make_counter(pipeline.engine, f"cus_{webhook_id}")
        # None of them has a message in Redis: it vanished, or was never sent.
        store_event(
            pipeline.engine,
            ids["pending"],
            COUNT,
            data={"customer_id": f"cus_{ids['pending']}"},
            status=EventStatus.PENDING,
            attempts=0,
            last_error=None,
            enqueued_at=long_ago,
        )
        store_event(
            pipeline.engine,
            ids["retrying"],
            COUNT,
            data={"customer_id": f"cus_{ids['retrying']}"},
            status=EventStatus.RETRYING,
            attempts=1,
            last_error="OperationalError: gone",
            next_attempt_at=long_ago,
        )
        store_event(
            pipeline.engine,
            ids["processing"],
            COUNT,
            data={"customer_id": f"cus_{ids['processing']}"},
            status=EventStatus.PROCESSING,
            attempts=1,
            last_error=None,
            lease_expires_at=long_ago,
        )
        for state, webhook_id in ids.items():
            row = wait_for_status(pipeline.engine, webhook_id, *FINAL)
            assert row.status == "processed", (state, row.last_error)
            assert row.attempts == (1 if state == "pending" else 2)
            assert counter(pipeline.engine, f"cus_{webhook_id}") == 1

    def test_event_whose_last_attempt_died_without_a_verdict_is_buried_with_its_error(
        self, pipeline: Pipeline
    ) -> None:
        """The worker was killed during attempt MAX_ATTEMPTS: dead, attempts not overcounted."""
        webhook_id = new_id()
        store_event(
            pipeline.engine,
            webhook_id,
            POISON,
            data={"customer_id": "cus_p"},
            status=EventStatus.PROCESSING,
            attempts=MAX_ATTEMPTS,
            last_error="RuntimeError: attempt 2 failed",
            lease_expires_at=utcnow() - timedelta(minutes=1),
        )
        row = wait_for_status(pipeline.engine, webhook_id, *FINAL)
        assert (row.status, row.attempts) == ("dead", MAX_ATTEMPTS)
        assert row.last_error == (
            f"gave up after {MAX_ATTEMPTS} attempts; last error: RuntimeError: attempt 2 failed"
        )
        assert "processing" not in pipeline.steps(webhook_id)


class TestClaim:
    """claim_event, in-process against PostgreSQL: who may take an event, and when."""

    def test_after_attempt_claims_only_the_attempt_whose_failure_was_not_written(
        self, clean_db: Engine
    ) -> None:
        factory = make_sessionmaker(clean_db)
        store_event(
            clean_db,
            "msg_1",
            COUNT,
            data={"customer_id": "c"},
            status=EventStatus.PROCESSING,
            attempts=2,
            lease_expires_at=utcnow() + timedelta(minutes=5),
        )
        assert claim_event(factory, "msg_1", 60, None) is None
        assert claim_event(factory, "msg_1", 60, 1) is None
        claim = claim_event(factory, "msg_1", 60, 2)
        assert claim is not None
        assert (claim.attempt, claim.last_error) == (3, "RuntimeError: boom")
        assert claim_event(factory, "msg_1", 60, 2) is None

    def test_a_claim_reads_the_row_as_stored_and_in_utc_whatever_the_session_zone(
        self, clean_db: Engine
    ) -> None:
        at, body = pending_payment(clean_db, "msg_z")
        # A server or role whose TimeZone is not UTC answers timestamptz in that zone.
        kolkata = create_engine(clean_db.url, connect_args={"options": "-c timezone=Asia/Kolkata"})
        try:
            claim = claim_event(make_sessionmaker(kolkata), "msg_z", 60, None)
        finally:
            kolkata.dispose()
        assert claim is not None
        assert claim.event_at == at
        assert claim.event_at.utcoffset() == timedelta(0)
        assert (claim.type, claim.attempt) == ("payment.succeeded", 1)
        assert claim.webhook_ts == int(at.timestamp())
        assert claim.body == body.encode()

    def test_final_events_are_never_claimed(self, clean_db: Engine) -> None:
        factory = make_sessionmaker(clean_db)
        for status in (EventStatus.DEAD, EventStatus.PROCESSED, EventStatus.IGNORED):
            store_event(clean_db, f"msg_{status}", COUNT, status=status, attempts=1)
            assert claim_event(factory, f"msg_{status}", 60, 1) is None
            assert event_row(clean_db, f"msg_{status}").attempts == 1


class TestFence:
    """apply_event, in-process: an attempt overtaken by another one commits no effect."""

    def test_the_attempt_whose_lease_was_taken_over_rolls_back_its_effects(
        self, clean_db: Engine
    ) -> None:
        pending_payment(clean_db, "msg_f")
        factory = make_sessionmaker(clean_db)
        stale = claim_event(factory, "msg_f", 0, None)  # a lease that runs out at once
        current = claim_event(factory, "msg_f", 60, None)
        assert stale is not None and current is not None
        assert (stale.attempt, current.attempt) == (1, 2)

        with pytest.raises(LostClaim), transaction(factory) as session:
            apply_event(session, stale)
        assert rows(clean_db, "payments") == 0
        assert event_row(clean_db, "msg_f").status == EventStatus.PROCESSING

        with transaction(factory) as session:
            assert apply_event(session, current) == (EventStatus.PROCESSED, Outcome.APPLIED)
        assert rows(clean_db, "payments") == 1
        assert event_row(clean_db, "msg_f").status == EventStatus.PROCESSED


def pending_payment(engine: Engine, webhook_id: str) -> tuple[datetime, str]:
    """A payment.succeeded recorded and not yet claimed; its time (store_event's) and body."""
    at = datetime(2026, 1, 1, tzinfo=UTC)
    body = json.dumps(sample_event("payment.succeeded", timestamp=at))
    store_event(
        engine,
        webhook_id,
        "payment.succeeded",
        body=body,
        status=EventStatus.PENDING,
        attempts=0,
        last_error=None,
    )
    return at, body


def rows(engine: Engine, table: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


class TestBackoff:
    def test_grows_exponentially_with_jitter_and_stays_below_the_visibility_timeout(
        self,
    ) -> None:
        config = load_settings(
            retry_backoff_base_seconds=2,
            retry_backoff_max_seconds=10_000,
            broker_visibility_timeout=600,
            _env_file=None,
        )
        for attempt, ceiling in [(1, 2), (2, 4), (3, 8), (6, 64)]:
            waits = [backoff_seconds(attempt, config) for _ in range(200)]
            assert all(ceiling / 2 <= w <= ceiling for w in waits)
            assert len(set(waits)) > 100
        assert max(backoff_seconds(40, config) for _ in range(200)) <= 300

    def test_database_and_broker_outages_are_transient_and_bugs_are_not(self) -> None:
        lost = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed"))
        assert classify(lost) is Failure.TRANSIENT
        for cause in (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
            wrapped = sqlalchemy.exc.DBAPIError.instance("UPDATE", {}, cause("x"), psycopg.Error)
            assert classify(wrapped) is Failure.TRANSIENT, cause
        assert classify(redis.exceptions.ConnectionError("refused")) is Failure.TRANSIENT
        assert classify(ConnectionError("reset")) is Failure.TRANSIENT
        assert classify(KeyError("customer_id")) is Failure.UNEXPECTED
        integrity = sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("duplicate key"))
        assert classify(integrity) is Failure.UNEXPECTED

    def test_a_payload_that_does_not_validate_is_permanent(self) -> None:
        """The verdict on the same bytes cannot change: the event is dead at once."""
        assert classify(EventValidationError("invalid event: data.payment_id")) is (
            Failure.PERMANENT
        )
        assert classify(EnvelopeError("invalid event: type")) is Failure.PERMANENT


class TestBrokerHardening:
    def test_transport_options_reach_the_redis_channel(self, redis_url: str) -> None:
        """Misspelt option names would be ignored silently by kombu: read them back."""
        config = load_settings(redis_url=redis_url, broker_visibility_timeout=1234, _env_file=None)
        app = make_celery(config)
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            assert channel.visibility_timeout == 1234
            assert channel.socket_timeout == 5
            assert channel.socket_connect_timeout == 5
            assert channel.health_check_interval == 10
            assert channel.client.connection_pool.connection_kwargs["socket_timeout"] == 5
        assert app.conf.worker_cancel_long_running_tasks_on_connection_loss is True
        assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
        # The longest countdown a retry can ask for, held by a worker, is not redelivered.
        assert backoff_seconds(100, config) < config.broker_visibility_timeout
