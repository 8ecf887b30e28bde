"""The change feed's push (workers/outbound.py) through real processes: gunicorn, a celery
worker with beat, PostgreSQL, Redis, and a receiver process of the test's own."""

from __future__ import annotations

import json
import random
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
import requests
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from cli.samples import sample_event
from shared.models import Change, DeliveryStatus, OutboundAttempt, OutboundDelivery, WebhookEvent
from shared.settings import Settings
from tests.support import (
    ADMIN_TOKEN,
    OUT_SECRET,
    Receiver,
    celery_worker,
    gunicorn,
    service_env,
    signed_headers,
    wait_until,
)

T0 = datetime(2026, 5, 1, 9, 0, tzinfo=UTC)
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
STATUSES = ("active", "on_hold", "renewed", "plan_changed", "cancelled", "expired")


def subscription_event(sub: str, step: int) -> tuple[str, str]:
    """The `step`-th event of a subscription's life: its webhook id and signed body."""
    status = STATUSES[step % len(STATUSES)]
    body = sample_event(
        f"subscription.{status}",
        timestamp=T0 + timedelta(minutes=step),
        overrides={
            "data.subscription_id": sub,
            "data.customer.customer_id": f"cus_{sub}",
            "data.quantity": step + 1,
        },
    )
    return f"msg_{sub}_{step}", json.dumps(body)


def send(ingest: str, webhook_id: str, body: str) -> None:
    answer = requests.post(
        f"{ingest}/webhooks/dodo", data=body, headers=signed_headers(body, webhook_id=webhook_id)
    )
    assert answer.status_code in (200, 202), answer.text


def wait_drained(engine: Engine, timeout: float = 90) -> None:
    def drained() -> bool:
        with Session(engine) as session:
            events_left = session.scalar(
                select(func.count())
                .select_from(WebhookEvent)
                .where(WebhookEvent.status.not_in(("processed", "ignored", "dead")))
            )
            pending = session.scalar(
                select(func.count())
                .select_from(OutboundDelivery)
                .where(OutboundDelivery.status != DeliveryStatus.DELIVERED)
            )
        return events_left == 0 and pending == 0

    wait_until(drained, timeout=timeout, interval=0.3, what="events applied, changes delivered")


def check_receiver_got_every_change_in_order(engine: Engine, receiver: Receiver) -> None:
    """Every change answered 2xx once at least, signature verified, per entity in feed order."""
    with Session(engine) as session:
        feed = session.scalars(select(Change).order_by(Change.seq)).all()
    accepted = [r for r in receiver.records() if r["mode"] == "ok"]
    assert all(r["verified"] for r in receiver.records())
    first_seen: dict[str, list[str]] = {}
    seen: set[str] = set()
    for record in accepted:
        data = record["body"]["data"]
        assert record["webhook_id"] == data["id"]
        assert record["body"]["type"] == f"{data['kind']}.changed"
        if data["id"] not in seen:
            seen.add(data["id"])
            first_seen.setdefault(data["entity_id"], []).append(data["id"])
    assert seen == {change.id for change in feed}
    for entity, ids in first_seen.items():
        in_feed = [c.id for c in feed if c.entity_id == entity]
        assert ids == in_feed, f"{entity}: received out of feed order"


class TestOutboundDelivery:
    @pytest.mark.slow
    def test_changes_reach_the_receiver_through_failures_timeouts_and_an_outage(
        self, settings: Settings, clean_db: Engine, receiver: Receiver, tmp_path: Path
    ) -> None:
        env = service_env(
            settings.database_url,
            settings.redis_url,
            OUTBOUND_WEBHOOK_URL=receiver.url,
            OUTBOUND_WEBHOOK_SECRET=OUT_SECRET,
            OUTBOUND_TIMEOUT_SECONDS="1",
            OUTBOUND_BACKOFF_BASE_SECONDS="0.2",
            OUTBOUND_BACKOFF_MAX_SECONDS="1",
            OUTBOUND_MAX_ATTEMPTS="100",
            REDRIVE_INTERVAL_SECONDS="0.5",
            REDRIVE_AFTER_SECONDS="1",
        )
        rng = random.Random(13)
        subs = [f"sub_out{n}" for n in range(6)]
        batches = []
        for phase in range(4):
            batch = [subscription_event(s, phase * 3 + i) for s in subs for i in range(3)]
            rng.shuffle(batch)
            batches.append(batch)
        extra = ["-B", "-s", str(tmp_path / "beat-schedule")]
        with gunicorn(env, tmp_path) as ingest, celery_worker(env, tmp_path, extra=extra):
            # 1. The receiver answers: everything arrives.
            started = time.monotonic()
            for webhook_id, body in batches[0]:
                send(ingest, webhook_id, body)
            wait_until(lambda: events_left(clean_db) == 0, timeout=30, what="events applied")
            applied_healthy = time.monotonic() - started
            wait_drained(clean_db)
            check_receiver_got_every_change_in_order(clean_db, receiver)

            # 2. It answers 500 for a while: attempts are recorded, with the answer's head.
            receiver.set_mode("500")
            for webhook_id, body in batches[1]:
                send(ingest, webhook_id, body)
            wait_until(
                lambda: failed_attempts(clean_db, 500) >= 5, timeout=30, what="500s recorded"
            )
            receiver.set_mode("ok")
            wait_drained(clean_db)
            with Session(clean_db) as session:
                heads = session.scalars(
                    select(OutboundAttempt.response_head).where(OutboundAttempt.status_code == 500)
                ).all()
            assert heads and all(h.startswith("receiver failing") for h in heads)
            assert max(len(h) for h in heads) <= 1024

            # 3. It times out: the events are applied meanwhile at their usual pace.
            receiver.set_mode("slow:3")
            started = time.monotonic()
            for webhook_id, body in batches[2]:
                send(ingest, webhook_id, body)
            wait_until(
                lambda: events_left(clean_db) == 0, timeout=30, what="events applied meanwhile"
            )
            applied_in = time.monotonic() - started
            wait_until(lambda: timeouts(clean_db) >= 1, timeout=30, what="a timeout recorded")
            receiver.set_mode("ok")
            wait_drained(clean_db)

            # 4. It is down, then back: the backlog drains.
            receiver.stop()
            for webhook_id, body in batches[3]:
                send(ingest, webhook_id, body)
            wait_until(lambda: events_left(clean_db) == 0, timeout=30, what="events applied")
            time.sleep(2)
            receiver.start()
            wait_drained(clean_db)
            check_receiver_got_every_change_in_order(clean_db, receiver)

            listed = requests.get(
                f"{ingest}/api/changes/deliveries", params={"status": "delivered"}, headers=AUTH
            ).json()["deliveries"]
            assert listed and all(d["status"] == "delivered" for d in listed)
        # The POSTs hanging 3 s each (timed out at 1 s) held sender threads, not the pool
        # processes: the events were applied about as fast as with a healthy receiver.
        assert applied_in < 2 * applied_healthy + 1.0, (applied_in, applied_healthy)


def failed_attempts(engine: Engine, status: int) -> int:
    with Session(engine) as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(OutboundAttempt)
                .where(OutboundAttempt.status_code == status)
            )
            or 0
        )


def timeouts(engine: Engine) -> int:
    with Session(engine) as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(OutboundAttempt)
                .where(OutboundAttempt.error.like("%Timeout%"))
            )
            or 0
        )


def events_left(engine: Engine) -> int:
    with Session(engine) as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(WebhookEvent)
                .where(WebhookEvent.status.not_in(("processed", "ignored", "dead")))
            )
            or 0
        )


class TestOutboundFaults:
    @pytest.mark.slow
    def test_worker_killed_mid_post_and_redis_emptied_lose_no_change(
        self, settings: Settings, clean_db: Engine, receiver: Receiver, tmp_path: Path
    ) -> None:
        """SIGKILL of the worker while POSTs are in flight, then every Redis key gone: each
        change still arrives, with the same webhook-id, per entity in order."""
        env = service_env(
            settings.database_url,
            settings.redis_url,
            OUTBOUND_WEBHOOK_URL=receiver.url,
            OUTBOUND_WEBHOOK_SECRET=OUT_SECRET,
            OUTBOUND_TIMEOUT_SECONDS="2",
            # The kill may catch an event mid-apply too: its lease runs out soon.
            LEASE_SECONDS="3",
            OUTBOUND_BACKOFF_BASE_SECONDS="0.2",
            OUTBOUND_BACKOFF_MAX_SECONDS="1",
            OUTBOUND_MAX_ATTEMPTS="100",
            REDRIVE_INTERVAL_SECONDS="0.5",
            REDRIVE_AFTER_SECONDS="1",
        )
        subs = [f"sub_kill{n}" for n in range(4)]
        events = [subscription_event(s, step) for step in range(4) for s in subs]
        extra = ["-B", "-s", str(tmp_path / "beat-schedule")]
        with gunicorn(env, tmp_path) as ingest:
            receiver.set_mode("slow:1.5")
            with celery_worker(env, tmp_path, name="doomed", extra=extra) as worker:
                for webhook_id, body in events:
                    send(ingest, webhook_id, body)
                wait_until(lambda: in_flight(clean_db) > 0, timeout=30, what="a POST in flight")
                worker.stop(signal.SIGKILL)
            redis.Redis.from_url(settings.redis_url).flushall()
            receiver.set_mode("ok")
            with celery_worker(env, tmp_path, name="second", extra=extra):
                wait_drained(clean_db)
        check_receiver_got_every_change_in_order(clean_db, receiver)
        with Session(clean_db) as session:
            counted = session.scalar(select(func.sum(OutboundDelivery.attempts)))
            recorded = session.scalar(select(func.count()).select_from(OutboundAttempt))
        # The kill cut POSTs short: attempts were counted that never got to record a verdict.
        assert int(counted or 0) > int(recorded or 0)


def in_flight(engine: Engine) -> int:
    with Session(engine) as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(OutboundDelivery)
                .where(OutboundDelivery.lease_until.is_not(None))
            )
            or 0
        )
