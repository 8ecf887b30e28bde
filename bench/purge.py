"""The retention purge over a large table, and the ingest's latency while it runs.

    python -m bench.purge [--rows 1000000] [--rate 200] [--duration 30] [--reps 2]

Seeds `--rows` processed events older than RETENTION_DAYS (a realistic payment body each),
then, per repetition, offers the ingest the same fixed rate twice: once alone, once while
`shared.lifecycle.purge` runs (as `dodo-webhooks purge` and beat's task do), and times the
purge. Latency is the open-loop generator's (bench/loadgen.py): from each request's scheduled
send time to its answer. Writes bench/results/purge.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select, text

from bench import stack
from bench.deliveries import new_secret, write_requests
from cli.samples import sample_event
from shared.db import make_engine, make_sessionmaker
from shared.envelope import Subjects, event_subjects
from shared.lifecycle import PurgeResult, erase_customer, purge
from shared.models import WebhookEvent

RESULTS = stack.ROOT / "bench" / "results" / "purge-pause-0.25.json"
RETENTION_DAYS = 30


TEMPLATE = json.dumps(sample_event("payment.succeeded")).replace("pay_sample0001", "pay_XID")
HEADERS = json.dumps(
    {"webhook-id": "msg_XID", "webhook-timestamp": "1", "webhook-signature": "v1," + "A" * 44}
)


def subjects_of(template: str) -> Subjects:
    """The `customer_id` and `payment_id` the ingest records for a body of this template
    (`XID` standing for each row's own part of the id)."""
    envelope = json.loads(template)
    return event_subjects(envelope["type"], envelope["data"])


def seed(engine: Engine, rows: int) -> int:
    """`rows` processed events, finished 40 days ago, each with its own id in the body and
    the customer and payment ids the ingest would have recorded with it."""
    template, headers = TEMPLATE, HEADERS
    subjects = subjects_of(template)
    old = datetime.now(UTC) - timedelta(days=RETENTION_DAYS + 10)
    chunk = 100_000
    with engine.begin() as conn:
        for start in range(0, rows, chunk):
            conn.execute(
                text(
                    """
                    INSERT INTO webhook_events (webhook_id, type, status, outcome, attempts,
                        body, headers, webhook_ts, event_at, received_at, processed_at,
                        customer_id, payment_id)
                    SELECT 'msg_seed_' || i, 'payment.succeeded', 'processed', 'applied', 1,
                        convert_to(replace(:body, 'XID', i::text), 'UTF8'),
                        replace(:headers, 'XID', i::text)::json,
                        1, CAST(:old AS timestamptz), CAST(:old AS timestamptz),
                        CAST(:old AS timestamptz) + i * interval '1 millisecond',
                        :customer_id, replace(:payment_id, 'XID', i::text)
                    FROM generate_series(CAST(:a AS bigint), CAST(:b AS bigint)) AS i
                    """
                ),
                {
                    "body": template,
                    "headers": headers,
                    "customer_id": subjects.customer_id,
                    "payment_id": subjects.payment_id,
                    "old": old,
                    "a": start,
                    "b": min(start + chunk, rows) - 1,
                },
            )
    checkpoint(engine)
    with engine.connect() as conn:
        conn.execute(text("ANALYZE webhook_events"))
        size = conn.execute(text("SELECT pg_total_relation_size('webhook_events')")).scalar_one()
    return int(size)


def time_erasure(engine: Engine, events: int = 20) -> dict[str, float]:
    """An erasure of one customer with `events` events among all the seeded rows. The
    events are found by the indexed `customer_id` and `payment_id` the seeded rows carry;
    only rows recorded without them (none here) are scanned body by body."""
    body = TEMPLATE.replace("cus_sample0001", "cus_bench_target")
    subjects = subjects_of(body)
    with engine.begin() as conn:
        conn.execute(
            text(
                """
                INSERT INTO webhook_events (webhook_id, type, status, outcome, attempts,
                    body, headers, webhook_ts, event_at, received_at, processed_at,
                    customer_id, payment_id)
                SELECT 'msg_target_' || i, 'payment.succeeded', 'processed', 'applied', 1,
                    convert_to(replace(:body, 'XID', 'target' || i), 'UTF8'), '{}'::json, 1,
                    now(), now(), now(),
                    :customer_id, replace(:payment_id, 'XID', 'target' || i)
                FROM generate_series(1, CAST(:n AS integer)) AS i
                """
            ),
            {
                "body": body,
                "n": events,
                "customer_id": subjects.customer_id,
                "payment_id": subjects.payment_id,
            },
        )
    factory = make_sessionmaker(engine)
    took = {}
    for dry in (True, False):
        started = time.monotonic()
        result = erase_customer(factory, "cus_bench_target", dry_run=dry, requested_by="bench")
        took["dry_run_s" if dry else "real_s"] = round(time.monotonic() - started, 2)
        assert result.counts["webhook_events"].rows == events, result.counts_json()
    return took


def offered_load(port: int, secret: str, rate: int, duration: float, work: Path, run: str) -> Any:
    prefix = work / f"load-{run}"
    n = int(rate * duration) + 1
    write_requests(prefix, n, secret, host=f"127.0.0.1:{port}", run=run, parts=1)
    argv = [sys.executable, "-m", "bench.loadgen", "--requests", str(prefix), "--port", str(port)]
    argv += ["--rate", str(rate), "--duration", str(duration)]
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=duration + 120,
        cwd=stack.ROOT,
        env={**os.environ, "PYTHONPATH": str(stack.ROOT)},
    )
    Path(f"{prefix}.0").unlink(missing_ok=True)
    if done.returncode != 0:
        raise RuntimeError(f"loadgen failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout)


def reset_purge(engine: Engine) -> None:
    """Give the seeded rows their bodies back between repetitions (a fresh table is slower
    to build than this)."""
    with engine.begin() as conn:
        conn.execute(
            text(
                """
                UPDATE webhook_events
                SET body = convert_to(replace(:body, 'XID', substr(webhook_id, 10)), 'UTF8'),
                    headers = replace(:headers, 'XID', substr(webhook_id, 10))::json,
                    purged_at = NULL
                WHERE webhook_id LIKE 'msg_seed_%'
                """
            ),
            {"body": TEMPLATE, "headers": HEADERS},
        )
        conn.execute(text("DELETE FROM lifecycle_counters"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE webhook_events"))
    checkpoint(engine)


def checkpoint(engine: Engine) -> None:
    """Write out what seeding left dirty now, not in the middle of a measurement: the
    checkpoints its WAL would force stall every commit, the ingest's included."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("CHECKPOINT"))
    time.sleep(5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rate", type=int, default=200, help="ingest requests per second")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument(
        "--pause", type=float, default=0.25, help="PURGE_PAUSE_SECONDS: seconds between batches"
    )
    args = parser.parse_args(argv)

    secret = new_secret()
    runs: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-purge-") as tmp,
        stack.bench_database() as db_url,
        stack.redis_server(Path(tmp)) as redis_url,
    ):
        work = Path(tmp)
        engine = make_engine(db_url)
        began = time.monotonic()
        table_bytes = seed(engine, args.rows)
        print(
            f"seeded {args.rows} rows ({table_bytes / 1e6:.0f} MB) in "
            f"{time.monotonic() - began:.0f}s",
            file=sys.stderr,
        )
        erasure = time_erasure(engine)
        print(f"erasure: {erasure}", file=sys.stderr)
        env = {
            "DATABASE_URL": db_url,
            "REDIS_URL": redis_url,
            "DODO_PAYMENTS_WEBHOOK_KEY": secret,
            "LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
        }
        with stack.gunicorn("ingest:create_app()", env, work, "ingest") as ingest:
            port: int = ingest.port  # type: ignore[attr-defined]
            for rep in range(args.reps):
                if rep:
                    reset_purge(engine)
                alone = offered_load(port, secret, args.rate, args.duration, work, f"a{rep}")
                result: list[PurgeResult] = []
                took: list[float] = []

                def run_purge(result: list[PurgeResult], took: list[float]) -> None:
                    started = time.monotonic()
                    result.append(
                        purge(
                            make_sessionmaker(engine),
                            retention_days=RETENTION_DAYS,
                            batch_size=args.batch_size,
                            pause_seconds=args.pause,
                        )
                    )
                    took.append(time.monotonic() - started)

                purger = threading.Thread(target=run_purge, args=(result, took))
                purger.start()
                during = offered_load(port, secret, args.rate, args.duration, work, f"p{rep}")
                overlapped = purger.is_alive()
                purger.join()
                runs.append(
                    {
                        "alone": alone,
                        "during_purge": during,
                        "purge_overlapped_whole_load": overlapped,
                        "purge_seconds": round(took[0], 1),
                        "purged_events": result[0].events,
                        "purged_bytes": result[0].bytes,
                    }
                )
                print(json.dumps(runs[-1]), file=sys.stderr)
        with engine.connect() as conn:
            left = conn.execute(
                select(func.count()).where(WebhookEvent.body.is_not(None))
            ).scalar_one()
        engine.dispose()
    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": args.rows,
        "seeded_table_bytes": table_bytes,
        "batch_size": args.batch_size,
        "pause_seconds": args.pause,
        "rate": args.rate,
        "duration_s": args.duration,
        "cpus": len(os.sched_getaffinity(0)),
        "bodies_left_after": int(left),
        "erasure_of_one_customer_with_20_events": erasure,
        "runs": runs,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    return 0


def table(report: dict[str, Any]) -> str:
    lines = [
        f"purge of {report['rows']} rows, {report['batch_size']} a transaction, "
        f"{report['pause_seconds']}s pause; ingest offered "
        f"{report['rate']}/s for {report['duration_s']:.0f}s",
        "REP  PURGE_S  ROWS/S   MB     LATENCY p50/p90/p99 ms alone   during purge",
    ]
    for rep, run in enumerate(report["runs"]):
        a, d = run["alone"]["latency_ms"], run["during_purge"]["latency_ms"]
        rate = run["purged_events"] / max(run["purge_seconds"], 1e-9)
        lines.append(
            f"{rep:<4} {run['purge_seconds']:<8} {rate:<8.0f} {run['purged_bytes'] / 1e6:<6.0f} "
            f"{a['p50']:.1f}/{a['p90']:.1f}/{a['p99']:.1f}".ljust(60)
            + f"{d['p50']:.1f}/{d['p90']:.1f}/{d['p99']:.1f}"
        )
    erasure = report["erasure_of_one_customer_with_20_events"]
    lines.append(
        f"erase-customer (20 events among {report['rows']} bodies): dry run "
        f"{erasure['dry_run_s']}s, real {erasure['real_s']}s"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
