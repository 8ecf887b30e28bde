"""The Celery application both sides build from Settings: queues, reliability, JSON only."""

from __future__ import annotations

from typing import Final
from urllib.parse import urlsplit

from celery import Celery
from kombu import Queue  # type: ignore[attr-defined]
from kombu.transport import redis as kombu_redis

from shared.catalog import EVENT_QUEUES, MAINTENANCE_QUEUE, queue_for
from shared.settings import Settings

PROCESS_EVENT: Final = "workers.process_event"
REDRIVE: Final = "workers.redrive"


class _QoS(kombu_redis.QoS):
    def restore_unacked(self, client: object = None) -> None:
        # After a lost broker connection Celery collects the connection and then closes it;
        # closing the channel restores its unacknowledged messages, which needs the
        # connection's address, already gone: kombu raised AttributeError and the whole
        # worker died ("Unrecoverable error") on every Redis restart. Those messages are
        # still in Redis' unacked set (Redis redelivers them after the visibility timeout)
        # and their events are durable in the database (beat re-drives them), so give up
        # restoring them here and let the worker reconnect.
        if client is None and self.channel.connection.client is None:
            self._delivered.clear()
            return
        super().restore_unacked(client)  # type: ignore[no-untyped-call]


class _Channel(kombu_redis.Channel):
    QoS = _QoS


class RedisTransport(kombu_redis.Transport):
    """kombu's Redis transport; a worker survives Redis going away (see `_QoS`)."""

    Channel = _Channel


def make_celery(settings: Settings, *, name: str = "dodo_webhooks") -> Celery:
    app = Celery(name, broker=settings.redis_url, set_as_current=False)
    if urlsplit(settings.redis_url).scheme == "redis":
        app.conf.broker_transport = f"{__name__}:RedisTransport"
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
        worker_send_task_events=True,
        task_send_sent_event=False,
        timezone="UTC",
        enable_utc=True,
    )
    return app


def enqueue(app: Celery, webhook_id: str, event_type: str | None) -> None:
    """Send the work signal; the event itself is already durable in the database."""
    app.send_task(PROCESS_EVENT, args=[webhook_id], queue=queue_for(event_type))
