"""Per-call cost of the ingest's steps, beside the ways they were done before (docs/performance.md).

    python -m bench.micro [--calls N]

In one process, against the bench's own database and redis-server: each variant is called N
times; the table shows wall and CPU microseconds per call (median of 5 batches). It measures
the steps in isolation, so the sum is not the request: gunicorn and Flask come on top.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import text
from sqlalchemy.engine import make_url

from bench.deliveries import Delivery, signed_deliveries
from bench.floor_app import create_app as create_floor_app
from bench.run import Config, record_and_queue, services
from ingest import create_app
from ingest.publisher import DirectPublisher
from ingest.recording import Recorder, _insert_sqlalchemy, delivery_row
from ingest.verify import Verifier
from shared.catalog import queue_for
from shared.db import insert_for, make_engine
from shared.envelope import read_envelope_head
from shared.logs import configure_logging, get_logger, log_step
from shared.models import WebhookEvent
from shared.queue import enqueue, make_celery
from shared.settings import load_settings

RAW_INSERT = (
    "INSERT INTO webhook_events (webhook_id, type, status, attempts, body, headers, webhook_ts,"
    " event_at, received_at, enqueued_at) VALUES (%s, %s, 'pending', 0, %s, %s, %s, %s, now(),"
    " now()) ON CONFLICT DO NOTHING RETURNING webhook_id"
)


def call_wsgi(app: Any, delivery: Delivery) -> str:
    """POST the delivery to a WSGI app as gunicorn would hand it over; the status line."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/webhooks/dodo",
        "SERVER_NAME": "micro",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(delivery.body),
        "wsgi.errors": sys.stderr,
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(delivery.body)),
    }
    for name, value in delivery.headers.items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    statuses: list[str] = []
    answer = app(environ, lambda status, headers, exc_info=None: statuses.append(status))
    b"".join(answer)
    getattr(answer, "close", lambda: None)()
    return statuses[0]


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
        deliveries: list[Delivery] = list(signed_deliveries(n * 15, svc.secret, run="m"))
        verifier = Verifier([svc.secret])
        engine = make_engine(svc.db_url)
        no_ping = make_engine(svc.db_url, pool_pre_ping=False)
        celery = make_celery(settings)
        dsn = make_url(svc.db_url).set(drivername="postgresql").render_as_string(False)
        raw = psycopg.connect(dsn, autocommit=True)
        producer = celery.producer_pool.acquire(block=True)

        recorder = Recorder(no_ping)
        publisher = DirectPublisher(svc.redis, celery)

        def fields(i: int) -> dict[str, Any]:
            d = deliveries[i + offset[0]]
            return {
                "webhook_id": d.webhook_id,
                "webhook_ts": d.webhook_ts,
                "headers": d.headers,
                "body": d.body,
                "event_type": d.event_type,
                "event_at": d.occurred,
            }

        def in_transaction(i: int) -> object:
            stmt = insert_for(engine)(WebhookEvent).on_conflict_do_nothing()
            with engine.begin() as conn:
                return conn.execute(
                    stmt.returning(WebhookEvent.webhook_id), delivery_row(**fields(i))
                )

        def through_sqlalchemy(e: object) -> Callable[[int], object]:
            return lambda i: _insert_sqlalchemy(e, delivery_row(**fields(i)))  # type: ignore[arg-type]

        # The whole request, in this process: the ingest app and the floor app, no gunicorn.
        os.environ.update(svc.env())
        apps = {"ingest": create_app(settings), "floor": create_floor_app()}

        def request(name: str) -> Callable[[int], object]:
            def step(i: int) -> object:
                status = call_wsgi(apps[name], deliveries[i + offset[0]])
                # 202; 200 once, when the first call repeats the warm-up's delivery.
                assert status.startswith(("202", "200")), status
                return status

            return step

        # The worker's own part of a task, without Celery: claim and apply recorded events of
        # the bench mix (the rows are written at the warm-up call).
        events = list(signed_deliveries(n + 1, svc.secret, run="w"))

        def worker(i: int) -> object:
            from workers.tasks import process_event  # reads the environment set above

            if i == 0 and not svc.recorded():
                record_and_queue(svc, events)
                svc.redis.flushdb()
            return process_event.run(events[i].webhook_id)

        # A log line's cost, written to a file as gunicorn's stderr would be, not to a terminal.
        configure_logging("INFO")
        log = get_logger("micro")
        log_file = open(Path(tmp) / "micro.log", "w")  # noqa: SIM115
        for handler in logging.getLogger("dodo_webhooks").handlers:
            handler.setStream(log_file)  # type: ignore[attr-defined]

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
            (
                "record: Recorder, prepared, libpq call (the ingest)",
                lambda i: recorder.record(**fields(i)),
            ),
            ("record through SQLAlchemy, autocommit (SQLite's path)", through_sqlalchemy(no_ping)),
            ("record through SQLAlchemy, pre-ping + transaction (before)", in_transaction),
            ("psycopg conn.execute INSERT ... RETURNING (before)", raw_insert),
            (
                "publish: DirectPublisher, LPUSH on a held connection (the ingest)",
                lambda i: publisher.send(deliveries[i].webhook_id, deliveries[i].event_type),
            ),
            (
                "one JSON log line at INFO",
                lambda i: log_step(log, "queued", webhook_id="msg_1", type="x"),
            ),
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
                "client.lpush of a ~1 KB message (pool checkout, retry wrapper)",
                lambda i: svc.redis.lpush("micro", deliveries[i].body),
            ),
            ("ingest app, one delivery, in process (no gunicorn)", request("ingest")),
            ("floor app, one delivery, in process (no gunicorn)", request("floor")),
            ("worker: claim + apply one event of the mix (no Celery)", worker),
        ]
        for label, step in variants:
            step(0)  # warm: imports, first connection, statement cache
            rows.append((label, *measure(n, step)))
            offset[0] += n + 1
            with engine.begin() as conn:
                conn.execute(text("TRUNCATE webhook_events"))
        producer.release()
        apps["ingest"].extensions["dodo"].close()
        recorder.close()
        log_file.close()
        raw.close()
        engine.dispose()
        no_ping.dispose()
    print(f"{'step':<60} {'wall µs':>9} {'CPU µs':>9}   ({n} calls each)")
    for label, wall, cpu in rows:
        print(f"{label:<60} {wall:>9.0f} {cpu:>9.0f}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
