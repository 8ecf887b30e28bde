"""Prometheus series of the ingest; what the workers did is read from the database at scrape."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from prometheus_client import Counter


@dataclass(frozen=True)
class IngestMetrics:
    received: Counter
    rejected: Counter
    duplicates: Counter
    queued: Counter
    dead_on_arrival: Counter
    record_failures: Counter


@lru_cache(maxsize=1)
def ingest_metrics() -> IngestMetrics:
    """Created once per process: the default registry refuses a second series of a name."""
    return IngestMetrics(
        received=Counter("dodo_webhooks_received", "Deliveries received at /webhooks/dodo"),
        rejected=Counter(
            "dodo_webhooks_rejected", "Deliveries refused, by HTTP status", ["reason"]
        ),
        duplicates=Counter("dodo_webhooks_duplicates", "Deliveries of an already recorded id"),
        queued=Counter("dodo_webhooks_queued", "Recorded deliveries sent to the queue"),
        dead_on_arrival=Counter(
            "dodo_webhooks_dead_on_arrival", "Verified bodies that are not a valid event"
        ),
        record_failures=Counter(
            "dodo_webhooks_record_failures", "Deliveries answered 503: could not be recorded"
        ),
    )
