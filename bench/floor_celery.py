"""The end-to-end floor: a no-op task on a Celery app with the product's own settings.

`make_celery` gives it the same reliability settings as the workers (acks late, reject on
worker lost, prefetch 1, JSON only, task events, the same queues); the task does nothing, so
draining it measures Celery and Redis alone:

    celery -A bench.floor_celery worker -c N   (REDIS_URL)
"""

from __future__ import annotations

import os

from celery import Celery

from shared.queue import make_celery
from shared.settings import Settings

NOOP = "bench.noop"


def make_floor_celery(redis_url: str) -> Celery:
    settings = Settings(redis_url=redis_url, _env_file=None)
    floor = make_celery(settings, name="bench_floor")
    floor.task(name=NOOP, acks_late=True)(noop)
    return floor


def noop(webhook_id: str, after_attempt: int | None = None) -> str:
    return "ok"


app = make_floor_celery(os.environ.get("REDIS_URL", "redis://localhost:6379/0"))
