"""The drain of workers/tasks.py: batches claimed in one statement, applied in savepoints."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
import redis
from celery import Celery
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from cli.samples import sample_event
from ingest.publisher import DirectPublisher
from shared.db import make_sessionmaker, transaction, utcnow
from shared.models import Base, CreditEntry, EventStatus, Outcome, Payment, WebhookEvent
from shared.queue import make_celery, send_drain, wake_key
from shared.settings import load_settings
from tests.dead_letter_support import (
    COUNT,
    FAST_RETRIES,
    SPOILT,
    counter,
    event_row,
    make_counter,
    routes_worker,
    wait_for_status,
)
from tests.support import ManagedProcess, envelope, service_env, signed_headers, wait_until
from workers import handlers, schemas
from workers.claims import (
    Applied,
    BatchFailed,
    Failed,
    Lost,
    apply_batch,
    claim_batch,
    claim_event,
)

MAX_ATTEMPTS = int(FAST_RETRIES["MAX_ATTEMPTS"])
FINAL = ("processed", "ignored", "dead")
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def record(
    engine: Engine,
    webhook_id: str,
    event_type: str,
    body: str,
    *,
    occurred: datetime = T0,
    received: datetime | None = None,
    status: EventStatus = EventStatus.PENDING,
) -> None:
    """A delivery as the ingest records it (pending), or in the state the test needs."""
    with Session(engine) as session, session.begin():
        session.add(
            WebhookEvent(
                webhook_id=webhook_id,
                type=event_type,
                status=status,
                attempts=0,
                body=body.encode(),
                headers=signed_headers(body, webhook_id=webhook_id),
                webhook_ts=int(occurred.timestamp()),
                event_at=occurred,
                received_at=received or utcnow(),
                enqueued_at=utcnow(),
            )
        )


def count_body(customer_id: str, event_type: str = COUNT) -> str:
    return envelope(event_type, {"customer_id": customer_id}, timestamp=T0)


def payment_body(payment_id: str, status: str, at: datetime) -> str:
    overrides = {"data.payment_id": payment_id, "data.status": status}
    return json.dumps(sample_event("payment.succeeded", timestamp=at, overrides=overrides))


class TestClaimBatch:
    """claim_batch, in-process against PostgreSQL."""

    def test_takes_at_most_the_limit_of_its_queue_oldest_received_first(
        self, clean_db: Engine
    ) -> None:
        now = utcnow()
        # Received in the order 0..4, occurred in the reverse order.
        for n in range(5):
            body = payment_body(f"pay_{n}", "succeeded", T0 - timedelta(minutes=n))
            record(
                clean_db,
                f"msg_{n}",
                "payment.succeeded",
                body,
                occurred=T0 - timedelta(minutes=n),
                received=now + timedelta(seconds=n),
            )
        record(clean_db, "msg_refund", "refund.succeeded", "{}")
        claims = claim_batch(make_sessionmaker(clean_db), "payments", 3, 60)
        # Grouped by the record each one writes (pay_0 < pay_1 < pay_2): one lock order.
        assert [c.webhook_id for c in claims] == ["msg_0", "msg_1", "msg_2"]
        assert {c.attempt for c in claims} == {1}
        statuses = {n: event_row(clean_db, f"msg_{n}").status for n in range(5)}
        assert statuses == {0: "processing", 1: "processing", 2: "processing"} | {
            3: "pending",
            4: "pending",
        }
        assert event_row(clean_db, "msg_refund").status == "pending"

    def test_skips_an_event_another_transaction_holds_without_waiting(
        self, clean_db: Engine
    ) -> None:
        for n in range(3):
            record(clean_db, f"msg_{n}", COUNT, count_body("c"))
        with clean_db.connect() as other:
            other.execute(
                text("SELECT 1 FROM webhook_events WHERE webhook_id = 'msg_1' FOR UPDATE")
            )
            claims = claim_batch(make_sessionmaker(clean_db), "other", 10, 60)
            other.rollback()
        assert sorted(c.webhook_id for c in claims) == ["msg_0", "msg_2"]
        assert event_row(clean_db, "msg_1").attempts == 0

    def test_retrying_processing_and_final_events_are_left_to_their_own_messages(
        self, clean_db: Engine
    ) -> None:
        for status in (
            EventStatus.RETRYING,
            EventStatus.PROCESSING,
            EventStatus.DEAD,
            EventStatus.PROCESSED,
        ):
            record(clean_db, f"msg_{status}", COUNT, count_body("c"), status=status)
        assert claim_batch(make_sessionmaker(clean_db), "other", 10, 60) == []
        with clean_db.connect() as conn:
            assert conn.execute(text("SELECT sum(attempts) FROM webhook_events")).scalar() == 0


@pytest.fixture
def test_routes() -> Iterator[None]:
    """The worker's test routes (tests/worker_with_test_routes.py), in this process, and
    the routing table and schemas as they were afterwards: importing that module adds its
    types to both, which later tests (the catalog's) must not see."""
    held = dict(handlers.ROUTES), dict(schemas.SCHEMAS)
    from tests import worker_with_test_routes as routes

    for event_type, handler in ((COUNT, routes.count), (SPOILT, routes.spoilt)):
        handlers.ROUTES[event_type] = handler
        schemas.SCHEMAS[event_type] = routes.TestEvent
    try:
        yield
    finally:
        for table, kept in zip((handlers.ROUTES, schemas.SCHEMAS), held, strict=True):
            table.clear()
            table.update(kept)  # type: ignore[arg-type]


class TestApplyBatch:
    """apply_batch, in-process: one savepoint per event."""

    def test_the_feed_lock_is_taken_at_the_batchs_end_not_by_its_first_change(
        self, clean_db: Engine, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Each event's change is kept until the batch's end and written there, under the
        feed's advisory lock (held to the commit): a second drain's batch is not held up
        behind this one's whole work, only behind its last inserts and commit."""
        from tests.handlers.events import T0
        from tests.lifecycle_support import ALICE, Feed, body_for
        from workers import claims as claims_module

        feed = Feed(clean_db)
        for n in range(3):
            feed.record(body_for("payment.succeeded", ALICE, T0, payment_id=f"pay_lock{n}"))
        held: list[int] = []
        real = claims_module.apply_event

        def watched(session: Session, *args: object, **kwargs: object) -> object:
            done = real(session, *args, **kwargs)  # type: ignore[arg-type]
            held.append(advisory_locks(session))
            return done

        monkeypatch.setattr(claims_module, "apply_event", watched)
        factory = make_sessionmaker(clean_db)
        claims = claim_batch(factory, "payments", 10, 60)
        with transaction(factory) as session:
            results = apply_batch(session, claims, isolate=False)
            at_end = advisory_locks(session)
        assert [type(r) for r in results] == [Applied] * 3
        assert held == [0, 0, 0] and at_end == 1
        with Session(clean_db) as session:
            seqs = session.execute(text("SELECT entity_id FROM changes ORDER BY seq")).scalars()
            assert list(seqs) == ["pay_lock0", "pay_lock1", "pay_lock2"]

    @pytest.mark.usefixtures("test_routes")
    def test_a_failing_event_rolls_back_alone_and_its_batch_mates_commit(
        self, clean_db: Engine
    ) -> None:
        make_counter(clean_db, "cus_a")
        record(clean_db, "msg_1", COUNT, count_body("cus_a"))
        record(clean_db, "msg_2", SPOILT, count_body("cus_a", SPOILT))  # writes, then raises
        record(clean_db, "msg_3", COUNT, count_body("cus_a"))
        factory = make_sessionmaker(clean_db)
        claims = claim_batch(factory, "other", 10, 60)
        with transaction(factory) as session:
            results = apply_batch(session, claims)
        verdicts = {r.claim.webhook_id: type(r) for r in results}
        assert verdicts == {"msg_1": Applied, "msg_2": Failed, "msg_3": Applied}
        assert counter(clean_db, "cus_a") == 2  # the spoilt event's increment rolled back
        assert event_row(clean_db, "msg_1").status == "processed"
        assert event_row(clean_db, "msg_2").status == "processing"  # for the caller to settle

    @pytest.mark.usefixtures("test_routes")
    def test_without_savepoints_a_failing_event_fails_the_batch_for_a_rerun(
        self, clean_db: Engine
    ) -> None:
        """The fast path: no savepoints; the caller rolls back and reruns it isolated."""
        make_counter(clean_db, "cus_b")
        record(clean_db, "msg_1", COUNT, count_body("cus_b"))
        record(clean_db, "msg_2", SPOILT, count_body("cus_b", SPOILT))
        factory = make_sessionmaker(clean_db)
        claims = claim_batch(factory, "other", 10, 60)
        with pytest.raises(BatchFailed), transaction(factory) as session:
            apply_batch(session, claims, isolate=False)
        assert counter(clean_db, "cus_b") == 0
        assert {event_row(clean_db, c.webhook_id).status for c in claims} == {"processing"}
        with transaction(factory) as session:
            results = apply_batch(session, claims, isolate=True)  # the same attempt, again
        assert [type(r) for r in results] == [Applied, Failed]
        assert counter(clean_db, "cus_b") == 1
        assert event_row(clean_db, "msg_1").attempts == 1

    def test_an_event_whose_claim_was_taken_over_is_lost_and_its_mates_applied(
        self, clean_db: Engine
    ) -> None:
        record(clean_db, "msg_a", "payment.succeeded", payment_body("pay_a", "succeeded", T0))
        record(clean_db, "msg_b", "payment.succeeded", payment_body("pay_b", "succeeded", T0))
        factory = make_sessionmaker(clean_db)
        claims = claim_batch(factory, "payments", 10, 0)  # leases that run out at once
        again = claim_event(factory, "msg_a", 60, None)
        assert again is not None and again.attempt == 2
        with transaction(factory) as session:
            results = apply_batch(session, claims)
        verdicts = {r.claim.webhook_id: type(r) for r in results}
        assert verdicts == {"msg_a": Lost, "msg_b": Applied}
        with Session(clean_db) as session:
            assert session.scalars(select(Payment.payment_id)).all() == ["pay_b"]
        assert event_row(clean_db, "msg_a").status == "processing"  # attempt 2's to finish

    def test_several_events_of_one_entity_apply_in_occurrence_order(self, clean_db: Engine) -> None:
        """Received newest first; the batch applies them oldest first, so none supersedes."""
        now = utcnow()
        for n, status in enumerate(("cancelled", "processing", "succeeded")):
            at = T0 - timedelta(minutes=n)
            record(
                clean_db,
                f"msg_{n}",
                "payment.succeeded",
                payment_body("pay_1", status, at),
                occurred=at,
                received=now + timedelta(seconds=n),
            )
        factory = make_sessionmaker(clean_db)
        with transaction(factory) as session:
            results = apply_batch(session, claim_batch(factory, "payments", 10, 60))
        assert [r.claim.webhook_id for r in results] == ["msg_2", "msg_1", "msg_0"]
        assert all(isinstance(r, Applied) and r.outcome is Outcome.APPLIED for r in results)
        with Session(clean_db) as session:
            payment = session.get(Payment, "pay_1")
            assert payment is not None and payment.status == "cancelled"


@dataclass
class Pipeline:
    engine: Engine
    celery: Celery
    redis_url: str
    worker: ManagedProcess

    def steps(self, webhook_id: str) -> list[str]:
        found = []
        for line in self.worker.output().splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("webhook_id") == webhook_id and "step" in entry:
                    found.append(entry["step"])
        return found

    def wake(self, webhook_id: str, event_type: str) -> None:
        """What the ingest does after recording a delivery."""
        client = redis.Redis.from_url(self.redis_url)
        publisher = DirectPublisher(client, self.celery)
        try:
            publisher.send(webhook_id, event_type)
        finally:
            publisher.close()
            client.close()


@pytest.fixture(scope="module")
def pipeline(
    pg_url: str, pg_engine: Engine, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    """A prefork worker with the test routes and embedded beat; MAX_ATTEMPTS=3, tiny backoff."""
    names = ", ".join(t.name for t in Base.metadata.sorted_tables)
    with pg_engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {names}"))
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    client.close()
    log_dir = tmp_path_factory.mktemp("drain")
    env = service_env(
        pg_url,
        redis_url,
        **FAST_RETRIES,
        DRAIN_BATCH_SIZE="20",
        REDRIVE_INTERVAL_SECONDS="0.5",
        REDRIVE_AFTER_SECONDS="1",
    )
    celery = make_celery(load_settings(database_url=pg_url, redis_url=redis_url, _env_file=None))
    extra = ["-B", "-s", str(log_dir / "beat-schedule")]
    with routes_worker(env, log_dir, name="drain", concurrency=2, extra=extra) as worker:
        yield Pipeline(pg_engine, celery, redis_url, worker)
    celery.close()


def new_id() -> str:
    return f"msg_{uuid.uuid4().hex[:12]}"


class TestDrain:
    """A real prefork worker drains what the ingest's wake signals."""

    def test_a_batch_with_a_spoilt_event_and_duplicate_signals_applies_each_mate_once(
        self, pipeline: Pipeline
    ) -> None:
        customers = [f"cus_{uuid.uuid4().hex[:8]}" for _ in range(3)]
        for customer in customers:
            make_counter(pipeline.engine, customer)
        ids: dict[str, str] = {}
        for n in range(30):  # more than a batch (20): a full batch calls for help
            ids[new_id()] = customers[n % 3]
        spoilt, invalid = new_id(), new_id()
        for webhook_id, customer in ids.items():
            record(pipeline.engine, webhook_id, COUNT, count_body(customer))
        record(pipeline.engine, spoilt, SPOILT, count_body(customers[0], SPOILT))
        record(pipeline.engine, invalid, COUNT, envelope(COUNT, {"wrong": 1}, timestamp=T0))
        for webhook_id in [*ids, spoilt, invalid]:
            pipeline.wake(webhook_id, COUNT)
        for _ in range(3):
            send_drain(pipeline.celery, "other")  # duplicate signals are harmless
        for webhook_id in ids:
            row = wait_for_status(pipeline.engine, webhook_id, *FINAL)
            assert (row.status, row.attempts) == ("processed", 1)
            assert pipeline.steps(webhook_id) == ["processing", "processed"]
        assert [counter(pipeline.engine, c) for c in customers] == [10, 10, 10]
        row = wait_for_status(pipeline.engine, spoilt, *FINAL)
        assert (row.status, row.attempts) == ("dead", MAX_ATTEMPTS)
        assert row.last_error == "RuntimeError: spoilt: fails after writing"
        assert pipeline.steps(spoilt) == ["processing", "retry"] * (MAX_ATTEMPTS - 1) + [
            "processing",
            "dead",
        ]
        row = wait_for_status(pipeline.engine, invalid, *FINAL)
        assert (row.status, row.attempts) == ("dead", 1)
        assert pipeline.steps(invalid) == ["processing", "dead"]

    def test_a_drain_that_found_its_queue_empty_clears_the_wake_and_the_next_event_wakes_it(
        self, pipeline: Pipeline
    ) -> None:
        customer = f"cus_{uuid.uuid4().hex[:8]}"
        make_counter(pipeline.engine, customer)
        client = redis.Redis.from_url(pipeline.redis_url)
        try:
            for _ in range(3):
                webhook_id = new_id()
                record(pipeline.engine, webhook_id, COUNT, count_body(customer))
                pipeline.wake(webhook_id, COUNT)
                wait_for_status(pipeline.engine, webhook_id, *FINAL, timeout=10)
                wait_until(lambda: not client.exists(wake_key("other")), timeout=5)
        finally:
            client.close()
        assert counter(pipeline.engine, customer) == 3

    def test_a_ledger_entry_under_two_delivery_ids_in_one_batch_counts_once(
        self, pipeline: Pipeline
    ) -> None:
        entry = f"cle_{uuid.uuid4().hex[:8]}"
        body = json.dumps(sample_event("credit.added", timestamp=T0, overrides={"data.id": entry}))
        first, second = new_id(), new_id()
        record(pipeline.engine, first, "credit.added", body)
        record(pipeline.engine, second, "credit.added", body)
        pipeline.wake(first, "credit.added")
        pipeline.wake(second, "credit.added")
        outcomes = {wait_for_status(pipeline.engine, w, *FINAL).outcome for w in (first, second)}
        assert "applied" in outcomes
        with Session(pipeline.engine) as session:
            held = session.scalars(select(CreditEntry).where(CreditEntry.id == entry)).all()
        assert len(held) == 1


def advisory_locks(session: Session) -> int:
    """Advisory locks this session's backend holds (the change feed's, shared/changes.py)."""
    return int(
        session.execute(
            text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                " AND pid = pg_backend_pid() AND granted"
            )
        ).scalar_one()
    )
