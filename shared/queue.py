"""The Celery application both sides build from Settings: queues, reliability, JSON only."""

from __future__ import annotations

from typing import Final

from celery import Celery
from kombu import Queue  # type: ignore[attr-defined]

from shared.catalog import EVENT_QUEUES, MAINTENANCE_QUEUE, queue_for
from shared.settings import Settings

PROCESS_EVENT: Final = "workers.process_event"
REDRIVE: Final = "workers.redrive"


def make_celery(settings: Settings, *, name: str = "dodo_webhooks") -> Celery:
    app = Celery(name, broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        # A task is acknowledged after it ran, and redelivered if its worker dies mid-way.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.broker_visibility_timeout,
            "socket_timeout": 5,
            "socket_connect_timeout": 5,
            "health_check_interval": 10,
            "retry_on_timeout": True,
        },
        broker_heartbeat=0,
        task_queues=[Queue(q) for q in (*EVENT_QUEUES, MAINTENANCE_QUEUE)],  # type: ignore[no-untyped-call]
        task_default_queue=MAINTENANCE_QUEUE,
        task_routes={REDRIVE: {"queue": MAINTENANCE_QUEUE}},
        beat_schedule_filename=settings.beat_schedule_file,
        worker_send_task_events=True,
        task_send_sent_event=False,
        timezone="UTC",
        enable_utc=True,
    )
    return app


def enqueue(app: Celery, webhook_id: str, event_type: str | None, *, retry: bool = True) -> None:
    """Send the work signal; the event itself is already durable in the database."""
    app.send_task(PROCESS_EVENT, args=[webhook_id], queue=queue_for(event_type), retry=retry)
