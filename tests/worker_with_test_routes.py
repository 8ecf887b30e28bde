"""A real `celery -A workers worker` whose routing table also holds a few test-only types.

Run as `python -m tests.worker_with_test_routes [worker options]`: the routes are added to
`workers.handlers.ROUTES` in this process before the prefork pool forks, so the product code
runs unchanged and carries no test hook.
"""

from __future__ import annotations

import sys

import redis
from pydantic import BaseModel, ConfigDict
from sqlalchemy import update
from sqlalchemy.orm import Session

from shared.models import CreditBalance, Outcome
from workers import app, settings
from workers.handlers import ROUTES, Delivery
from workers.schemas import SCHEMAS

COUNT = "test.count"
POISON = "test.poison"
FLAKY = "test.flaky"
SPOILT = "test.spoilt"


class TestData(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    customer_id: str
    # test.flaky fails this many times before it succeeds.
    fail_times: int = 0


class TestEvent(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    type: str
    data: TestData


def count(session: Session, event: TestEvent, delivery: Delivery) -> Outcome:
    """A deliberately non-idempotent effect: applied twice, the counter shows 2."""
    session.execute(
        update(CreditBalance)
        .where(CreditBalance.customer_id == event.data.customer_id)
        .values(entry_count=CreditBalance.entry_count + 1)
    )
    return Outcome.APPLIED


def poison(session: Session, event: TestEvent, delivery: Delivery) -> Outcome:
    raise RuntimeError("poison: this handler always fails")


def flaky(session: Session, event: TestEvent, delivery: Delivery) -> Outcome:
    # Counted outside the rolled-back transaction, so each failed attempt is remembered.
    client = redis.Redis.from_url(settings.redis_url)
    calls = int(client.incr(f"test:flaky:{delivery.webhook_id}"))
    client.close()
    if calls <= event.data.fail_times:
        raise ConnectionError(f"simulated outage, call {calls}")
    return count(session, event, delivery)


def spoilt(session: Session, event: TestEvent, delivery: Delivery) -> Outcome:
    """Writes its effect, then fails: what it wrote must not survive the failure."""
    count(session, event, delivery)
    raise RuntimeError("spoilt: fails after writing")


for event_type, handler in ((COUNT, count), (POISON, poison), (FLAKY, flaky), (SPOILT, spoilt)):
    ROUTES[event_type] = handler
    SCHEMAS[event_type] = TestEvent

if __name__ == "__main__":
    app.worker_main(["worker", *sys.argv[1:]])
