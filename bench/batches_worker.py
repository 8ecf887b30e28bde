"""The celery-batches side of bench/batches.py: `celery -A bench.batches_worker worker -c W`.

One `celery_batches.Batches` task consumes the event queues, one message per event (its
webhook id); every FLUSH_EVERY messages (the product's DRAIN_BATCH_SIZE), or every
FLUSH_INTERVAL seconds, the worker's main process hands the buffered messages to a pool
process as one batch, which claims and applies them (bench/batches_apply.py) and is then
acknowledged, every message at once.

The product's Celery settings (`make_celery`: acks late, JSON, task events, the same queues
and visibility timeout) except the one celery-batches cannot work with: a prefetch of 1 per
process. A batch is FLUSH_EVERY messages delivered and not yet acknowledged, all counted
against the prefetch, so the prefetch must exceed FLUSH_EVERY; it is PREFETCH_MULTIPLIER x
FLUSH_EVERY per pool process, a batch running in each process and the next one filling in
the main process. Some settings stay set and do nothing here: celery-batches runs a batch
outside Celery's per-request path, so reject-on-worker-lost does not apply (a batch whose
pool process dies is neither acknowledged nor rejected: its messages wait in Redis' unacked
set until the worker restarts or the visibility timeout), and task events are not sent per
message or per batch. Needs the `bench` extra (celery-batches).
"""

from __future__ import annotations

import os
from typing import Any, Final

from celery import Celery, Task
from celery_batches import Batches, SimpleRequest

from bench.batches_apply import APPLY_MESSAGES, BATCH_LOGGED, apply_messages
from shared.logs import get_logger
from shared.queue import make_celery
from workers.tasks import database, settings

FLUSH_EVERY: Final = settings.drain_batch_size
# The lower end of 0.1-0.25 s: what a message waits at low rates for a batch that never
# fills (up to FLUSH_INTERVAL, half of it on average). A backlog fills batches by count
# only if the main process consumes more than FLUSH_EVERY / FLUSH_INTERVAL messages/s (the
# smoke runs: 275-554/s, so half-full batches). BENCH_BATCHES_FLUSH_INTERVAL overrides it.
FLUSH_INTERVAL: Final = float(os.environ.get("BENCH_BATCHES_FLUSH_INTERVAL", "0.1"))
PREFETCH_MULTIPLIER: Final = 2

log = get_logger("bench.batches")


def make_batches_celery() -> Celery:
    batches = make_celery(settings, name="bench_batches")
    # The only setting changed: see the module docstring.
    batches.conf.worker_prefetch_multiplier = PREFETCH_MULTIPLIER * FLUSH_EVERY
    batches.task(
        name=APPLY_MESSAGES,
        base=Batches,
        bind=True,
        acks_late=True,
        flush_every=FLUSH_EVERY,
        flush_interval=FLUSH_INTERVAL,
    )(apply_batch_of_messages)
    return batches


def apply_batch_of_messages(self: Task, requests: list[SimpleRequest]) -> int:
    webhook_ids: list[Any] = [request.args[0] for request in requests]
    done = apply_messages(self, database.sessions(), webhook_ids, settings.lease_seconds)
    log.info(BATCH_LOGGED, extra={"step": "batch", "messages": len(requests), "finished": done})
    return done


app = make_batches_celery()
