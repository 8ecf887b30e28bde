"""Prometheus series of the ingest; what the workers did is read from the database at scrape."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import Engine, case, func, select, text
from sqlalchemy.orm import Session

from shared.changes import outbound_summary
from shared.db import utcnow
from shared.lifecycle import PURGED_BYTES, PURGED_EVENTS, oldest_body_kept
from shared.models import (
    FINAL_STATUSES,
    CustomerErasure,
    EventStatus,
    LifecycleCounter,
    ReconcileRun,
    WebhookEvent,
)

# A scrape must not hang on a slow database: PostgreSQL cancels the queries after this.
DB_QUERY_TIMEOUT_MS = 2000
NOT_FINAL = tuple(s for s in EventStatus if s not in FINAL_STATUSES)


@dataclass(frozen=True)
class IngestMetrics:
    received: Counter
    rejected: Counter
    duplicates: Counter
    queued: Counter
    deferred: Counter
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
        deferred=Counter(
            "dodo_webhooks_queue_deferred",
            "Recorded deliveries not sent to the queue (Redis unreachable): beat re-drives them",
        ),
        dead_on_arrival=Counter(
            "dodo_webhooks_dead_on_arrival", "Verified bodies that are not a valid event"
        ),
        record_failures=Counter(
            "dodo_webhooks_record_failures", "Deliveries answered 503: could not be recorded"
        ),
    )


class EventStoreCollector(Collector):
    """Series read from `webhook_events` at scrape time: cluster-wide, and they survive restarts.

    One GROUP BY over the table and one indexed MIN; on any database error the scrape still
    answers, with `dodo_webhooks_metrics_db_up 0` and none of these series.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        up = GaugeMetricFamily(
            "dodo_webhooks_metrics_db_up", "1 when the database answered this scrape's queries"
        )
        started = time.monotonic()
        try:
            groups, oldest, outbound = self._query()
            lifecycle = self._lifecycle()
        except Exception:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily(
            "dodo_webhooks_metrics_db_query_seconds",
            "Time the database queries of this scrape took",
            value=time.monotonic() - started,
        )

        by_status = {str(s): 0 for s in EventStatus}
        processed = CounterMetricFamily(
            "dodo_webhooks_processed",
            "Events processed by the workers, by type and outcome (applied, superseded, ignored)",
            labels=["type", "outcome"],
        )
        retries = CounterMetricFamily(
            "dodo_webhooks_retries",
            "Processing attempts beyond each event's first, by type",
            labels=["type"],
        )
        dead = GaugeMetricFamily(
            "dodo_webhooks_dead", "Events dead now (the dead letters), by type", labels=["type"]
        )
        retry_sums: dict[str, int] = {}
        for status, event_type, outcome, count, extra_attempts in groups:
            label = event_type or "none"
            by_status[status] = by_status.get(status, 0) + count
            retry_sums[label] = retry_sums.get(label, 0) + int(extra_attempts or 0)
            if status == EventStatus.PROCESSED:
                processed.add_metric([label, outcome or "applied"], count)
            elif status == EventStatus.IGNORED:
                processed.add_metric([label, "ignored"], count)
            elif status == EventStatus.DEAD:
                dead.add_metric([label], count)
        for label, total in sorted(retry_sums.items()):
            retries.add_metric([label], total)

        events = GaugeMetricFamily(
            "dodo_webhooks_events", "Recorded events by current status", labels=["status"]
        )
        for status, count in by_status.items():
            events.add_metric([status], count)
        yield events
        yield processed
        yield retries
        yield dead
        yield GaugeMetricFamily(
            "dodo_webhooks_pending",
            "Events not yet final (pending, processing or retrying)",
            value=sum(by_status[s] for s in NOT_FINAL),
        )
        age = max(0.0, (utcnow() - oldest).total_seconds()) if oldest else 0.0
        yield GaugeMetricFamily(
            "dodo_webhooks_oldest_pending_age_seconds",
            "Age of the oldest event not yet final; 0 when none",
            value=age,
        )
        yield from lifecycle_series(*lifecycle)
        yield from outbound_series(outbound)

    def _query(
        self,
    ) -> tuple[
        list[tuple[str, str | None, str | None, int, int]], datetime | None, list[dict[str, Any]]
    ]:
        ev = WebhookEvent
        grouped = select(
            ev.status,
            ev.type,
            ev.outcome,
            func.count(),
            func.sum(case((ev.attempts > 1, ev.attempts - 1), else_=0)),
        ).group_by(ev.status, ev.type, ev.outcome)
        oldest = select(func.min(ev.received_at)).where(ev.status.in_([str(s) for s in NOT_FINAL]))
        with self._engine.connect() as conn, conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(text(f"SET LOCAL statement_timeout = {DB_QUERY_TIMEOUT_MS}"))
            rows = [tuple(row) for row in conn.execute(grouped)]
            first = conn.execute(oldest).scalar()
            with Session(bind=conn) as session:
                outbound = outbound_summary(session)
        return rows, first, outbound

    def _lifecycle(self) -> tuple[dict[str, int], datetime | None, int]:
        with self._engine.connect() as conn, conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(text(f"SET LOCAL statement_timeout = {DB_QUERY_TIMEOUT_MS}"))
            totals = {
                name: int(value)
                for name, value in conn.execute(
                    select(LifecycleCounter.name, LifecycleCounter.value)
                )
            }
            first = oldest_body_kept(conn)
            erasures = int(
                conn.execute(select(func.count()).select_from(CustomerErasure)).scalar() or 0
            )
        return totals, first, erasures


def lifecycle_series(
    totals: dict[str, int], oldest_body: datetime | None, erasures: int
) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """The purge's running totals, how far back raw bodies go, and how many erasures ran."""
    yield CounterMetricFamily(
        "dodo_webhooks_purged_events",
        "Events whose raw body and headers the retention purge removed",
        value=totals.get(PURGED_EVENTS, 0),
    )
    yield CounterMetricFamily(
        "dodo_webhooks_purged_bytes",
        "Bytes of raw bodies and headers the retention purge removed",
        value=totals.get(PURGED_BYTES, 0),
    )
    age = max(0.0, (utcnow() - oldest_body).total_seconds()) if oldest_body else 0.0
    yield GaugeMetricFamily(
        "dodo_webhooks_oldest_body_age_seconds",
        "Time since the oldest processed or ignored event still holding its raw body finished "
        "processing; stays near RETENTION_DAYS while the purge keeps up; 0 when none",
        value=age,
    )
    yield CounterMetricFamily(
        "dodo_webhooks_customer_erasures",
        "Customer erasures run (dodo-webhooks erase-customer, POST /api/customers/<id>/erase)",
        value=erasures,
    )


class ReconcileCollector(Collector):
    """The latest reconciliation with Dodo's API (`reconcile_runs`): when, what it found."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            with self._engine.connect() as conn, conn.begin():
                if conn.dialect.name == "postgresql":
                    conn.execute(text(f"SET LOCAL statement_timeout = {DB_QUERY_TIMEOUT_MS}"))
                run = conn.execute(
                    select(ReconcileRun).order_by(ReconcileRun.started_at.desc()).limit(1)
                ).first()
        except Exception:
            return  # the events' series say whether the database answered
        if run is None:
            return
        finished = run.finished_at or run.started_at
        yield GaugeMetricFamily(
            "dodo_webhooks_reconcile_last_run_timestamp_seconds",
            "When the latest reconciliation with Dodo's API finished (Unix time)",
            value=finished.timestamp(),
        )
        yield GaugeMetricFamily(
            "dodo_webhooks_reconcile_last_run_ok",
            "1 when the latest reconciliation ran to its end, 0 when it stopped on an error",
            value=0 if run.error else 1,
        )
        differences = GaugeMetricFamily(
            "dodo_webhooks_reconcile_differences",
            "Objects the latest reconciliation found missing or different, by family",
            labels=["family"],
        )
        recorded = GaugeMetricFamily(
            "dodo_webhooks_reconcile_recorded",
            "Synthetic events the latest reconciliation recorded, by family",
            labels=["family"],
        )
        for family, counts in sorted((run.counts or {}).items()):
            differences.add_metric(
                [family], int(counts.get("missing", 0)) + int(counts.get("differs", 0))
            )
            recorded.add_metric([family], int(counts.get("recorded", 0)))
        yield differences
        yield recorded
        yield GaugeMetricFamily(
            "dodo_webhooks_reconcile_api_calls",
            "Requests the latest reconciliation sent to Dodo's API",
            value=run.api_calls,
        )


def outbound_series(
    summary: list[dict[str, Any]],
) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """The change feed's outbound deliveries, by URL."""
    pending = GaugeMetricFamily(
        "dodo_webhooks_outbound_pending", "Outbound deliveries not yet sent or dead", labels=["url"]
    )
    oldest = GaugeMetricFamily(
        "dodo_webhooks_outbound_oldest_pending_age_seconds",
        "Age of the oldest pending outbound delivery; 0 when none",
        labels=["url"],
    )
    delivered = CounterMetricFamily(
        "dodo_webhooks_outbound_delivered", "Outbound deliveries answered 2xx", labels=["url"]
    )
    failed = CounterMetricFamily(
        "dodo_webhooks_outbound_failed",
        "Outbound POSTs that failed (no answer, or not 2xx)",
        labels=["url"],
    )
    dead = GaugeMetricFamily(
        "dodo_webhooks_outbound_dead", "Outbound deliveries dead now", labels=["url"]
    )
    for entry in summary:
        url = [entry["url"]]
        pending.add_metric(url, entry["pending"])
        oldest.add_metric(url, entry["oldest_pending_age"])
        delivered.add_metric(url, entry["delivered"])
        failed.add_metric(url, entry["failed"])
        dead.add_metric(url, entry["dead"])
    yield from (pending, oldest, delivered, failed, dead)


def process_registry() -> CollectorRegistry:
    """This process's counters, or every gunicorn worker's under PROMETHEUS_MULTIPROC_DIR."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return REGISTRY


def render_metrics(engine: Engine) -> bytes:
    """The exposition text: the ingest's counters, then the database's series."""
    store = CollectorRegistry(auto_describe=False)
    store.register(EventStoreCollector(engine))
    store.register(ReconcileCollector(engine))
    return generate_latest(process_registry()) + generate_latest(store)
