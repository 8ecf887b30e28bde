"""The work signal to Redis, one round trip per delivery, which never holds up an acknowledgement.

A delivery wakes its family's drain (shared/queue.py `WAKE_SCRIPT`): one `drain` message per
queue while none is queued or running, rather than one message per event.
"""

from __future__ import annotations

import base64
import hashlib
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
from shared.queue import (
    DRAIN,
    PROCESS_EVENT,
    WAKE_SCRIPT,
    WAKE_TTL_SECONDS,
    send_drain,
    wake_key,
)


class QueueSignal:
    """Wakes the drain of each recorded delivery's queue; quiet for a while after a failure.

    A publish to an unreachable Redis takes from half a second (refused) to several
    (timeouts); paid on every request it would starve gunicorn's workers while the database,
    which is what the 2xx promises, is fine. After a failure the ingest stops trying for
    `cooldown` seconds: those deliveries are recorded and beat's re-drive queues them.
    """

    def __init__(self, celery: Celery, client: redis.Redis, *, cooldown: float = 5.0) -> None:
        self._celery = celery
        self._client = client
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
                queue = queue_for(event_type)
                if self._client.set(wake_key(queue), 1, nx=True, ex=WAKE_TTL_SECONDS):
                    send_drain(self._celery, queue, retry=False)
        except Exception:
            self._quiet_until = time.monotonic() + self._cooldown
            raise
        return True


_NO_CALLBACKS: Final = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def process_event_message(webhook_id: str, queue: str, *, origin: str, reply_to: str) -> bytes:
    """The message `send_task(PROCESS_EVENT, args=[webhook_id], queue=queue)` writes to Redis."""
    return task_message(PROCESS_EVENT, [webhook_id], queue, origin=origin, reply_to=reply_to)


def drain_message(queue: str, *, origin: str, reply_to: str) -> bytes:
    """The message `send_drain(app, queue)` writes to Redis."""
    return task_message(DRAIN, [queue], queue, origin=origin, reply_to=reply_to)


def task_message(task: str, args: list[str], queue: str, *, origin: str, reply_to: str) -> bytes:
    """The message `send_task(task, args=args, queue=queue)` writes to Redis.

    Celery's task protocol 2 in kombu's Redis envelope, built directly: Celery's own publish
    path costs about 0.5 ms of CPU per message, most of the ingest's budget, and LPUSHing this
    costs a sixth of it. tests/test_queue.py holds it equal to what Celery writes, so an
    upgrade that changes the format fails there; every end-to-end test consumes it with a
    real worker.
    """
    task_id = str(uuid.uuid4())
    body = json.dumps([args, {}, _NO_CALLBACKS]).encode()
    message = {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": task,
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
            "argsrepr": repr(args),
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


_WAKE_SHA: Final = hashlib.sha1(WAKE_SCRIPT.encode()).hexdigest()


class DirectPublisher:
    """Wakes a queue's drain with one EVALSHA on the broker's Redis (the ingest's path).

    The script sets the queue's wake flag and, only if it was not set, LPUSHes one `drain`
    message (built here, equal to what `send_drain` writes): one round trip per delivery, as
    the LPUSH of a message per event was, but one Celery task per batch of events instead of
    one per event. Only for a plain `redis://`/`rediss://` broker, which kombu's Redis
    transport serves from a list named after the queue (priority 0, no key prefix);
    `QueueSignal` covers the rest through Celery.

    The command goes over a connection held per process and thread, with the client's
    settings, not through the client's pool, whose checkout polls the socket (a system call)
    and whose retry wrapper cost as much CPU as the command (docs/performance.md). A
    connection the server closed (Redis restarted) is replaced and the command tried once
    more, as the client would; a second wake is harmless, the drain's claim is idempotent.
    A Redis restarted empty has forgotten the script: EVAL loads it again.
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
        """Wake the drain of this delivery's queue (a no-op in Redis while one is awake)."""
        queue = queue_for(event_type)
        message = drain_message(queue, origin=self._origin, reply_to=self._reply_to)
        try:
            self._wake(queue, message)
        except redis.ConnectionError:
            self._wake(queue, message)  # on a new connection; refused again, it raises

    def close(self) -> None:
        """Close this thread's connection (the others close with their process)."""
        conn = self._connections.drop()
        if conn is not None:
            conn.disconnect()  # type: ignore[no-untyped-call]

    def _wake(self, queue: str, message: bytes) -> None:
        keys = (wake_key(queue), queue, message, WAKE_TTL_SECONDS)
        try:
            self._command("EVALSHA", _WAKE_SHA, 2, *keys)
        except redis.exceptions.NoScriptError:
            self._command("EVAL", WAKE_SCRIPT, 2, *keys)

    def _command(self, *args: object) -> None:
        conn = self._connections.get()
        try:
            conn.send_command(*args)  # type: ignore[no-untyped-call]
            conn.read_response()
        except redis.ResponseError:
            raise  # Redis answered (out of memory, say): the connection is in step
        except BaseException:
            # A command half sent or an answer unread: the connection is not reusable.
            conn.disconnect()  # type: ignore[no-untyped-call]
            raise
