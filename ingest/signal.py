"""The work signal to Redis, which must never hold up an acknowledgement."""

from __future__ import annotations

import time

import redis
from celery import Celery

from shared.queue import DirectPublisher, enqueue


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
