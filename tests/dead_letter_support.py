"""Helpers for the dead-letter and retry tests: stored events and a worker with test routes."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from shared.db import utcnow
from shared.models import CreditBalance, EventStatus, WebhookEvent
from tests.support import (
    VENV_BIN,
    ManagedProcess,
    celery_worker,
    envelope,
    signed_headers,
    wait_until,
)

COUNT = "test.count"
POISON = "test.poison"
FLAKY = "test.flaky"
SPOILT = "test.spoilt"

# Small enough that a poison event dies in well under a second.
FAST_RETRIES = {
    "MAX_ATTEMPTS": "3",
    "RETRY_BACKOFF_BASE_SECONDS": "0.05",
    "RETRY_BACKOFF_MAX_SECONDS": "1",
}


def store_event(
    engine: Engine,
    webhook_id: str,
    event_type: str | None,
    *,
    data: Mapping[str, Any] | None = None,
    status: EventStatus = EventStatus.DEAD,
    attempts: int = 3,
    last_error: str | None = "RuntimeError: boom",
    received_at: datetime | None = None,
    body: str | None = None,
    **columns: Any,
) -> None:
    """A recorded delivery with a real signed body, in whatever state the test needs."""
    at = datetime(2026, 1, 1, tzinfo=UTC)
    if body is None:
        body = envelope(event_type or "unknown", data or {}, timestamp=at)
    with Session(engine) as session, session.begin():
        session.add(
            WebhookEvent(
                webhook_id=webhook_id,
                type=event_type,
                status=status,
                attempts=attempts,
                last_error=last_error,
                body=body.encode(),
                headers=signed_headers(body, webhook_id=webhook_id),
                webhook_ts=int(at.timestamp()),
                event_at=at if event_type else None,
                received_at=received_at or utcnow(),
                processed_at=utcnow() if status == EventStatus.DEAD else None,
                **columns,
            )
        )


def counter(engine: Engine, customer_id: str) -> int:
    """The test.count handler's effect counter for a customer."""
    with Session(engine) as session:
        row = session.get(CreditBalance, (customer_id, "ent_test"))
        assert row is not None
        return row.entry_count


def make_counter(engine: Engine, customer_id: str) -> None:
    with Session(engine) as session, session.begin():
        session.add(
            CreditBalance(customer_id=customer_id, credit_entitlement_id="ent_test", entry_count=0)
        )


def event_row(engine: Engine, webhook_id: str) -> WebhookEvent:
    with Session(engine) as session:
        row = session.scalars(
            select(WebhookEvent).where(WebhookEvent.webhook_id == webhook_id)
        ).one()
        session.expunge(row)
        return row


def wait_for_status(
    engine: Engine, webhook_id: str, *statuses: str, timeout: float = 30
) -> WebhookEvent:
    wait_until(
        lambda: event_row(engine, webhook_id).status in statuses,
        timeout=timeout,
        what=f"{webhook_id} to be {' or '.join(statuses)}",
    )
    return event_row(engine, webhook_id)


def queued(redis_url: str, queue: str) -> int:
    """Messages waiting in one of the broker's queues."""
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.llen(queue))
    finally:
        client.close()


def queued_tasks(redis_url: str, queue: str) -> list[str]:
    """The task each message waiting in one of the broker's queues runs."""
    client = redis.Redis.from_url(redis_url)
    try:
        return [json.loads(m)["headers"]["task"] for m in client.lrange(queue, 0, -1)]
    finally:
        client.close()


def hours_ago(hours: float) -> datetime:
    return utcnow() - timedelta(hours=hours)


@contextmanager
def routes_worker(
    env: Mapping[str, str],
    log_dir: Path,
    *,
    name: str = "dlq",
    concurrency: int = 2,
    extra: list[str] | None = None,
) -> Iterator[ManagedProcess]:
    """A prefork Celery worker as a user runs it, plus the test routes (poison, count, flaky)."""
    command = [str(VENV_BIN / "python"), "-m", "tests.worker_with_test_routes"]
    with celery_worker(
        env, log_dir, name=name, concurrency=concurrency, extra=extra, command=command
    ) as proc:
        yield proc
