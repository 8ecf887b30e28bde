"""Per-call cost of the ingest's steps, and of the cheaper ways proposed in docs/performance.md.

    python -m bench.micro [--calls N]

In one process, against the bench's own database and redis-server: each variant is called N
times; the table shows wall and CPU microseconds per call (median of 5 batches). It measures
the steps in isolation, so the sum is not the request: gunicorn and Flask come on top.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
from sqlalchemy import text
from sqlalchemy.engine import make_url

from bench.deliveries import Delivery, signed_deliveries
from bench.run import Config, services
from ingest.recording import record_delivery
from ingest.verify import Verifier
from shared.catalog import queue_for
from shared.db import make_engine
from shared.envelope import read_envelope_head
from shared.queue import enqueue, make_celery
from shared.settings import load_settings

RAW_INSERT = (
    "INSERT INTO webhook_events (webhook_id, type, status, attempts, body, headers, webhook_ts,"
    " event_at, received_at, enqueued_at) VALUES (%s, %s, 'pending', 0, %s, %s, %s, %s, now(),"
    " now()) ON CONFLICT DO NOTHING RETURNING webhook_id"
)


def measure(calls: int, step: Callable[[int], object]) -> tuple[float, float]:
    """(wall µs, CPU µs) per call, the median of 5 batches."""
    walls, cpus = [], []
    per_batch = max(1, calls // 5)
    for batch in range(5):
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(batch * per_batch, (batch + 1) * per_batch):
            step(i)
        walls.append((time.perf_counter() - wall) / per_batch * 1e6)
        cpus.append((time.process_time() - cpu) / per_batch * 1e6)
    return statistics.median(walls), statistics.median(cpus)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.micro", description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args(argv)
    n = args.calls
    cfg = Config(
        mode="micro",
        reps=1,
        duration=1,
        connections=[],
        threads=1,
        rates=[],
        rate_duration=0,
        events=0,
        workers=[],
        e2e_reps=1,
        out=Path(tempfile.gettempdir()),
        as_json=False,
    )
    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="dodo-micro-") as tmp, services(cfg, Path(tmp)) as svc:
        settings = load_settings(
            database_url=svc.db_url,
            redis_url=svc.redis_url,
            dodo_payments_webhook_key=svc.secret,
            _env_file=None,
        )
        deliveries: list[Delivery] = list(signed_deliveries(n * 6, svc.secret, run="m"))
        verifier = Verifier([svc.secret])
        engine = make_engine(svc.db_url)
        no_ping = make_engine(svc.db_url, pool_pre_ping=False)
        celery = make_celery(settings)
        dsn = make_url(svc.db_url).set(drivername="postgresql").render_as_string(False)
        raw = psycopg.connect(dsn, autocommit=True)
        producer = celery.producer_pool.acquire(block=True)

        def record(e: object) -> Callable[[int], object]:
            def step(i: int) -> object:
                d = deliveries[i + offset[0]]
                return record_delivery(
                    e,  # type: ignore[arg-type]
                    webhook_id=d.webhook_id,
                    webhook_ts=d.webhook_ts,
                    headers=d.headers,
                    body=d.body,
                    event_type=d.event_type,
                    event_at=d.occurred,
                )

            return step

        def raw_insert(i: int) -> object:
            d = deliveries[i + offset[0]]
            return raw.execute(
                RAW_INSERT,
                (
                    d.webhook_id,
                    d.event_type,
                    d.body,
                    psycopg.types.json.Jsonb(d.headers),
                    d.webhook_ts,
                    d.occurred,
                ),
            ).fetchone()

        offset = [0]
        variants: list[tuple[str, Callable[[int], object]]] = [
            (
                "verify (standardwebhooks, 1 secret)",
                lambda i: verifier.verify(deliveries[i].body, deliveries[i].headers),
            ),
            ("envelope parse (pydantic)", lambda i: read_envelope_head(deliveries[i].body)),
            ("record_delivery as is (pre-ping, INSERT, COMMIT)", record(engine)),
            ("record_delivery, engine without pre-ping", record(no_ping)),
            ("raw psycopg INSERT ... RETURNING, autocommit", raw_insert),
            (
                "enqueue as is (Celery send_task)",
                lambda i: enqueue(celery, deliveries[i].webhook_id, deliveries[i].event_type),
            ),
            (
                "send_task with a held producer",
                lambda i: celery.send_task(
                    "workers.process_event",
                    args=[deliveries[i].webhook_id],
                    queue=queue_for(deliveries[i].event_type),
                    producer=producer,
                ),
            ),
            (
                "bare redis LPUSH of a ~1 KB message",
                lambda i: svc.redis.lpush("micro", deliveries[i].body),
            ),
        ]
        for label, step in variants:
            step(0)  # warm: imports, first connection, statement cache
            rows.append((label, *measure(n, step)))
            offset[0] += n + 1
            with engine.begin() as conn:
                conn.execute(text("TRUNCATE webhook_events"))
        producer.release()
        raw.close()
        engine.dispose()
        no_ping.dispose()
    print(f"{'step':<52} {'wall µs':>9} {'CPU µs':>9}   ({n} calls each)")
    for label, wall, cpu in rows:
        print(f"{label:<52} {wall:>9.0f} {cpu:>9.0f}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
