"""What the celery-batches task of bench/batches_worker.py does with a batch of messages.

Each message names one recorded event (its webhook id, as the ingest's `process_event`
message did before the drain). The batch claims exactly those events in one statement, as
the product's batch claim does (pending -> processing, the attempt counted, a lease; in
autocommit), and applies them with the product's own batch path (`workers.tasks.drain_batch`:
`apply_batch` in one transaction, failures settled and retried as a drain's are, the same log
lines). Only the claim differs from the drain's: by ids instead of the oldest N of a queue.
Kept apart from the worker module so that it imports without celery-batches installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Final

from celery import Task
from sqlalchemy import ARRAY, String, any_, bindparam, update
from sqlalchemy.orm import Session, sessionmaker

from shared.catalog import queue_for
from shared.db import utcnow
from shared.models import EventStatus
from workers.claims import CLAIM_RETURNS, CLAIMED, EVENTS, Claim, lock_key, run_claim
from workers.tasks import drain_batch

# The celery-batches task's name (bench/batches_worker.py), which bench/batches.py sends to.
APPLY_MESSAGES: Final = "bench.batches.apply_messages"
# Its log line per batch, from which bench/batches.py tells how full the batches were.
BATCH_LOGGED: Final = "celery-batches batch"
# `= ANY(array)`: one statement text whatever the batch's size (IN (...) would expand per size).
CLAIM_IDS: Final = (
    update(EVENTS)
    .where(
        EVENTS.c.webhook_id == any_(bindparam("b_ids", type_=ARRAY(String()))),
        EVENTS.c.status == EventStatus.PENDING,
    )
    .values(**CLAIMED)
    .returning(EVENTS.c.webhook_id, *CLAIM_RETURNS)
)
_NEVER: Final = datetime.min.replace(tzinfo=UTC)


def claim_ids(
    factory: sessionmaker[Session], webhook_ids: Sequence[str], lease_seconds: int
) -> list[Claim]:
    """Claim the pending events among `webhook_ids` in one statement, committed at once.

    Ordered as `claim_batch` orders a drain's batch: by the record each event writes (the
    batch mixes queues here, so the queue first), then by occurrence, so that two batches
    applied at once take their row locks in one global order.
    """
    now = utcnow()
    params = {"b_ids": list(webhook_ids), "b_lease_until": now + timedelta(seconds=lease_seconds)}
    claims = run_claim(factory, CLAIM_IDS, params)

    def order(c: Claim) -> tuple[object, ...]:
        queue = queue_for(c.type)
        return (queue, lock_key(queue, c), c.event_at or _NEVER, c.webhook_ts, c.webhook_id)

    return sorted(claims, key=order)


def apply_messages(
    task: Task, factory: sessionmaker[Session], webhook_ids: Sequence[str], lease_seconds: int
) -> int:
    """Claim and apply the events the batch's messages name; how many it finished."""
    claims = claim_ids(factory, webhook_ids, lease_seconds)
    return drain_batch(task, factory, claims) if claims else 0
