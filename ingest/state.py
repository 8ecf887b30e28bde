"""What each request of the ingest works with: its settings, connections and metrics."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from celery import Celery
from flask import current_app
from sqlalchemy import Engine

from ingest.metrics import IngestMetrics
from ingest.publisher import QueueSignal
from ingest.recording import Recorder
from ingest.verify import Verifier
from shared.settings import Settings


@dataclass
class IngestState:
    settings: Settings
    engine: Engine
    recorder: Recorder
    celery: Celery
    signal: QueueSignal
    verifier: Verifier
    metrics: IngestMetrics
    redis: redis.Redis

    def close(self) -> None:
        """Close the app's connections (tests, and anything that makes apps on the fly)."""
        self.recorder.close()
        self.signal.close()
        self.engine.dispose()
        self.redis.close()


def state() -> IngestState:
    """The state `create_app` made for the app serving this request."""
    return current_app.extensions["dodo"]  # type: ignore[no-any-return]
