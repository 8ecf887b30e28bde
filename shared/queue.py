"""The Celery application both sides build from Settings: queues, reliability, JSON only."""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from typing import Any, Final
from urllib.parse import urlsplit

import redis
from celery import Celery
from kombu import Queue  # type: ignore[attr-defined]
from kombu.transport import redis as kombu_redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared.catalog import EVENT_QUEUES, MAINTENANCE_QUEUE, queue_for
from shared.perthread import PerThread
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


_NO_CALLBACKS: Final = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def process_event_message(webhook_id: str, queue: str, *, origin: str, reply_to: str) -> bytes:
    """The message `send_task(PROCESS_EVENT, args=[webhook_id], queue=queue)` writes to Redis.

    Celery's task protocol 2 in kombu's Redis envelope, built directly: Celery's own publish
    path costs about 0.5 ms of CPU per message, most of the ingest's budget, and LPUSHing this
    costs a sixth of it. tests/test_queue.py holds it equal to what Celery writes, so an
    upgrade that changes the format fails there; every end-to-end test consumes it with a
    real worker.
    """
    task_id = str(uuid.uuid4())
    body = json.dumps([[webhook_id], {}, _NO_CALLBACKS]).encode()
    message = {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": PROCESS_EVENT,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": repr([webhook_id]),
            "kwargsrepr": "{}",
            "origin": origin,
            "ignore_result": None,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": reply_to,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return json.dumps(message).encode()


class DirectPublisher:
    """Sends PROCESS_EVENT messages with one LPUSH on the broker's Redis (the ingest's path).

    Only for a plain `redis://`/`rediss://` broker, which kombu's Redis transport serves from
    a list named after the queue (priority 0, no key prefix); `enqueue` covers the rest.

    The LPUSH goes over a connection held per process and thread, with the client's settings,
    not through the client's pool, whose checkout polls the socket (a system call) and whose
    retry wrapper cost as much CPU as the command (docs/performance.md). A connection the
    server closed (Redis restarted) is replaced and the push tried once more, as the client
    would; a second LPUSH of the same signal is harmless, the worker's claim is idempotent.
    """

    def __init__(self, client: redis.Redis, app: Celery) -> None:
        pool = client.connection_pool
        self._connections: PerThread[redis.Connection] = PerThread(
            lambda: pool.connection_class(**pool.connection_kwargs)  # connects on first use
        )
        self._origin = f"gen{os.getpid()}@{socket.gethostname()}"
        self._reply_to = str(app.thread_oid)

    @staticmethod
    def supports(broker_url: str) -> bool:
        return urlsplit(broker_url).scheme in ("redis", "rediss")

    def send(self, webhook_id: str, event_type: str | None) -> None:
        queue = queue_for(event_type)
        message = process_event_message(
            webhook_id, queue, origin=self._origin, reply_to=self._reply_to
        )
        try:
            self._lpush(queue, message)
        except redis.ConnectionError:
            self._lpush(queue, message)  # on a new connection; refused again, it raises

    def close(self) -> None:
        """Close this thread's connection (the others close with their process)."""
        conn = self._connections.drop()
        if conn is not None:
            conn.disconnect()  # type: ignore[no-untyped-call]

    def _lpush(self, queue: str, message: bytes) -> None:
        conn = self._connections.get()
        try:
            conn.send_command("LPUSH", queue, message)  # type: ignore[no-untyped-call]
            conn.read_response()
        except redis.ResponseError:
            raise  # Redis answered (out of memory, say): the connection is in step
        except BaseException:
            # A command half sent or an answer unread: the connection is not reusable.
            conn.disconnect()  # type: ignore[no-untyped-call]
            raise
