"""The Celery application both sides build from Settings: queues, reliability, JSON only."""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import urlsplit

from celery import Celery
from kombu import Queue  # type: ignore[attr-defined]
from kombu.transport import redis as kombu_redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared.catalog import EVENT_QUEUES, MAINTENANCE_QUEUE, OUTBOUND_QUEUE, queue_for
from shared.settings import Settings

PROCESS_EVENT: Final = "workers.process_event"
REDRIVE: Final = "workers.redrive"
RECONCILE: Final = "workers.reconcile"
PURGE: Final = "workers.purge"
DELIVER_CHANGE: Final = "workers.deliver_change"
REDRIVE_DELIVERIES: Final = "workers.redrive_deliveries"
DRAIN: Final = "workers.drain"


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

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        params: dict[str, Any] = super()._connparams(asynchronous=asynchronous)  # type: ignore[no-untyped-call]
        if asynchronous:
            # The worker's event loop reads BRPOP and pub/sub (remote control) replies on
            # these connections. redis-py retries a broken one by itself: it reconnected
            # the pub/sub connection to the new Redis and then waited there, blocking, for a
            # broadcast - the whole worker hung, never consuming again, never noticing the
            # restart. Without that retry the error reaches kombu, and the worker
            # reconnects, declares its queues again and carries on.
            params["retry"] = Retry(NoBackoff(), 0)
        return params


class RedisTransport(kombu_redis.Transport):
    """kombu's Redis transport, with which a worker survives Redis going away or restarting
    empty (see `_QoS` and `_Channel._connparams`): found by tests/faults."""

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
        task_queues=[Queue(q) for q in (*EVENT_QUEUES, MAINTENANCE_QUEUE, OUTBOUND_QUEUE)],  # type: ignore[no-untyped-call]
        task_default_queue=MAINTENANCE_QUEUE,
        task_routes={
            REDRIVE: {"queue": MAINTENANCE_QUEUE},
            RECONCILE: {"queue": MAINTENANCE_QUEUE},
            PURGE: {"queue": MAINTENANCE_QUEUE},
            REDRIVE_DELIVERIES: {"queue": MAINTENANCE_QUEUE},
            DELIVER_CHANGE: {"queue": OUTBOUND_QUEUE},
        },
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


def enqueue_deliveries(app: Celery, delivery_ids: list[int], *, retry: bool = True) -> None:
    """Signal outbound deliveries; each is durable in the database already."""
    for delivery_id in delivery_ids:
        app.send_task(DELIVER_CHANGE, args=[delivery_id], queue=OUTBOUND_QUEUE, retry=retry)


# --- the drain signal ------------------------------------------------------------------
# The ingest wakes a queue's drain instead of sending one message per event: a flag per
# queue, set with NX, and one `drain` message only when it was not set already. The drain
# deletes the flag when it finds its queue empty, then looks once more, so an event recorded
# meanwhile is never left without a wake. The TTL bounds how long a flag left by a killed
# drain holds back new wakes (beat's re-drive covers the rest).
WAKE_TTL_SECONDS: Final = 10
WAKE_SCRIPT: Final = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then
  redis.call('LPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
"""


def wake_key(queue: str) -> str:
    """The Redis key that says a drain of `queue` is queued or running."""
    return f"dodo:wake:{queue}"


def send_drain(
    app: Celery,
    queue: str,
    *,
    continued: bool = False,
    retry: bool = True,
    countdown: float | None = None,
) -> None:
    """Queue one more drain of `queue` (no flag involved: a duplicate drain is harmless).

    `continued`: a drain handing over after its time budget, which calls no one for help.
    """
    kwargs = {"continued": True} if continued else {}
    app.send_task(DRAIN, args=[queue], kwargs=kwargs, queue=queue, retry=retry, countdown=countdown)
