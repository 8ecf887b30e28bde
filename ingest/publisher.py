"""The work signal to Redis, one LPUSH per delivery, which never holds up an acknowledgement."""

from __future__ import annotations

import base64
import json
import os
import socket
import time
import uuid
from typing import Final
from urllib.parse import urlsplit

import redis
from celery import Celery

from ingest.perthread import PerThread
from shared.catalog import queue_for
from shared.queue import PROCESS_EVENT, enqueue


class QueueSignal:
    """Publishes one message per recorded delivery; quiet for a while after a failure.

    A publish to an unreachable Redis takes from half a second (refused) to several
    (timeouts); paid on every request it would starve gunicorn's workers while the database,
    which is what the 2xx promises, is fine. After a failure the ingest stops trying for
    `cooldown` seconds: those deliveries are recorded and beat's re-drive queues them.
    """

    def __init__(self, celery: Celery, client: redis.Redis, *, cooldown: float = 5.0) -> None:
        self._celery = celery
        broker = str(celery.conf.broker_url)
        self._direct = DirectPublisher(client, celery) if DirectPublisher.supports(broker) else None
        self._cooldown = cooldown
        self._quiet_until = 0.0

    def close(self) -> None:
        if self._direct is not None:
            self._direct.close()

    def send(self, webhook_id: str, event_type: str | None) -> bool:
        """True when published; False when skipped in the quiet period. Raises on failure."""
        if time.monotonic() < self._quiet_until:
            return False
        try:
            if self._direct is not None:
                self._direct.send(webhook_id, event_type)
            else:
                # No retries here: the re-drive is the retry, and it does not keep Dodo waiting.
                enqueue(self._celery, webhook_id, event_type, retry=False)
        except Exception:
            self._quiet_until = time.monotonic() + self._cooldown
            raise
        return True


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
