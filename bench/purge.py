"""The retention purge over a large table, and the ingest's latency while it runs.

    python -m bench.purge [--rows 1000000] [--days 30] [--bodies days|rows] [--rate 100]
                          [--window 20] [--baseline 5]

Seeds `--rows` processed events older than RETENTION_DAYS (a realistic payment body each),
starts the ingest (gunicorn, the product's app) and offers it a fixed rate, open loop
(bench/loadgen.py: latency from each request's scheduled send time), in windows of
`--window` seconds: first `--baseline` windows with nothing else running, then windows
that alternate between the purge running and the purge stopped, until the purge is done,
then `--baseline` windows again.

`--bodies days` (the default, as the ingest stores them since migration 0008): the rows are
spread over `--days` days, their bodies in those days' partitions, and each purge window
runs `shared.lifecycle.purge` once with the retention that makes one more day old enough,
as beat's task finds one more day to drop each day. `--bodies rows` (events recorded before
0008): the bodies in the rows, and each purge window runs the purge in place for the
window's length (`run_seconds`, as beat's task runs it).

Each purge window's p50 and p99 is set against the stopped windows on either side of it,
and that difference against the same difference between windows where no purge ran at
all: that is the noise. Per window it also counts PostgreSQL's checkpoints and autovacuum
runs of `webhook_events`. Writes bench/results/purge.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select, text

from bench import stack
from bench.deliveries import new_secret, write_requests
from cli.samples import sample_event
from shared.bodies import Day, ensure_days
from shared.db import make_engine, make_sessionmaker
from shared.envelope import Subjects, event_subjects
from shared.lifecycle import erase_customer, purge
from shared.models import EventBody, WebhookEvent
from shared.settings import Settings

RESULTS = stack.ROOT / "bench" / "results" / "purge.json"
# The product's own defaults for PURGE_BATCH_SIZE and PURGE_PAUSE_SECONDS.
DEFAULTS = Settings.model_fields
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


# The seeded days, by age: the youngest is this many days old (older than RETENTION_DAYS).
YOUNGEST_DAY = RETENTION_DAYS + 11


def seed_days(engine: Engine, rows: int, spread_over: int) -> tuple[int, list[int]]:
    """`rows` processed events spread over `spread_over` days (UTC), the youngest
    YOUNGEST_DAY days old, their bodies and headers in those days' partitions as the ingest
    writes them, each with its own id in the body and the customer and payment ids the
    ingest would have recorded with it. The bodies' bytes on disk, and the days' ages,
    oldest first."""
    template, headers = TEMPLATE, HEADERS
    subjects = subjects_of(template)
    today = datetime.now(UTC).date()
    ages = list(range(YOUNGEST_DAY + spread_over - 1, YOUNGEST_DAY - 1, -1))
    ensure_days(engine, today - timedelta(days=ages[0]), today - timedelta(days=ages[-1]))
    per_day = -(-rows // spread_over)
    chunk = 100_000
    with engine.begin() as conn:
        for n, age in enumerate(ages):
            start_of_day = Day(today - timedelta(days=age)).start
            first, last = n * per_day, min((n + 1) * per_day, rows) - 1
            for a in range(first, last + 1, chunk):
                b = min(a + chunk, last + 1) - 1
                params = {
                    "body": template,
                    "headers": headers,
                    "customer_id": subjects.customer_id,
                    "payment_id": subjects.payment_id,
                    "day": start_of_day,
                    # Over the day, evenly: a row every `step` microseconds.
                    "step": 86_000_000_000 // max(1, last - first + 1),
                    "first": first,
                    "a": a,
                    "b": b,
                }
                at = "CAST(:day AS timestamptz) + (i - :first) * :step * interval '1 microsecond'"
                conn.execute(
                    text(
                        f"""
                        INSERT INTO webhook_events (webhook_id, type, status, outcome, attempts,
                            webhook_ts, event_at, received_at, processed_at,
                            customer_id, payment_id)
                        SELECT 'msg_seed_' || i, 'payment.succeeded', 'processed', 'applied', 1,
                            1, {at}, {at}, {at} + interval '50 milliseconds',
                            :customer_id, replace(:payment_id, 'XID', i::text)
                        FROM generate_series(CAST(:a AS bigint), CAST(:b AS bigint)) AS i
                        """
                    ),
                    params,
                )
                conn.execute(
                    text(
                        f"""
                        INSERT INTO event_bodies (webhook_id, stored_at, body, headers)
                        SELECT 'msg_seed_' || i, {at},
                            convert_to(replace(:body, 'XID', i::text), 'UTF8'),
                            replace(:headers, 'XID', i::text)::json
                        FROM generate_series(CAST(:a AS bigint), CAST(:b AS bigint)) AS i
                        """
                    ),
                    params,
                )
    checkpoint(engine)
    with engine.connect() as conn:
        conn.execute(text("ANALYZE webhook_events"))
        conn.execute(text("ANALYZE event_bodies"))
        size = conn.execute(
            text(
                "SELECT sum(pg_total_relation_size(inhrelid)) FROM pg_inherits"
                " WHERE inhparent = 'event_bodies'::regclass"
            )
        ).scalar_one()
    return int(size), ages


def seed(engine: Engine, rows: int) -> int:
    """`rows` processed events, finished 40 days ago, each with its own id in the body and
    the customer and payment ids the ingest would have recorded with it, the bodies in the
    rows (as recorded before migration 0008)."""
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


def time_erasure(engine: Engine, events: int = 20, *, in_days: bool = True) -> dict[str, float]:
    """An erasure of one customer with `events` events among all the seeded rows. The
    events are found by the indexed `customer_id` and `payment_id` the seeded rows carry;
    only rows recorded without them (none here) are scanned body by body. `in_days`: their
    bodies in today's partition, as the ingest stores them."""
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
        if in_days:
            conn.execute(
                text(
                    "INSERT INTO event_bodies (webhook_id, stored_at, body, headers)"
                    " SELECT webhook_id, received_at, body, headers FROM webhook_events"
                    " WHERE webhook_id LIKE 'msg_target_%'"
                )
            )
            conn.execute(
                text(
                    "UPDATE webhook_events SET body = NULL, headers = NULL"
                    " WHERE webhook_id LIKE 'msg_target_%'"
                )
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


@dataclass(frozen=True)
class Rig:
    work: Path
    engine: Engine
    secret: str
    env: dict[str, str]


@contextmanager
def rig(prefix: str) -> Iterator[Rig]:
    """A work folder, a fresh migrated database and its engine, a redis-server of its own,
    and the ingest's environment for them (with a new signing secret)."""
    secret = new_secret()
    with (
        tempfile.TemporaryDirectory(prefix=prefix) as tmp,
        stack.bench_database() as db_url,
        stack.redis_server(Path(tmp)) as redis_url,
    ):
        engine = make_engine(db_url)
        env = {
            "DATABASE_URL": db_url,
            "REDIS_URL": redis_url,
            "DODO_PAYMENTS_WEBHOOK_KEY": secret,
            "LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
        }
        try:
            yield Rig(Path(tmp), engine, secret, env)
        finally:
            engine.dispose()


@contextmanager
def ingest(bench: Rig) -> Iterator[int]:
    """The ingest (gunicorn, the product's app) on the rig's database and Redis: its port."""
    with stack.gunicorn("ingest:create_app()", bench.env, bench.work, "ingest") as proc:
        yield proc.port  # type: ignore[attr-defined]


def checkpoint(engine: Engine) -> None:
    """Write out what seeding left dirty now, not in the middle of a measurement: the
    checkpoints its WAL would force stall every commit, the ingest's included."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("CHECKPOINT"))
    time.sleep(5)


def database_counters(engine: Engine) -> dict[str, int]:
    """Checkpoints (timed and requested) and autovacuum runs of `webhook_events` so far."""
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_stat_clear_snapshot()"))
        checkpoints = conn.execute(
            text("SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter")
        ).scalar_one()
        vacuums = conn.execute(
            text(
                "SELECT autovacuum_count FROM pg_stat_user_tables WHERE relname = 'webhook_events'"
            )
        ).scalar_one()
    return {"checkpoints": int(checkpoints), "autovacuums": int(vacuums)}


def window(
    engine: Engine, port: int, secret: str, args: argparse.Namespace, work: Path, name: str
) -> dict[str, Any]:
    before = database_counters(engine)
    load = offered_load(port, secret, args.rate, args.window, work, name)
    after = database_counters(engine)
    return {
        "latency_ms": load["latency_ms"],
        "statuses": load["statuses"],
        **{key: after[key] - before[key] for key in after},
    }


Job = Callable[[], dict[str, Any]]


def window_beside(
    engine: Engine,
    port: int,
    secret: str,
    args: argparse.Namespace,
    work: Path,
    name: str,
    job: Job | None,
) -> dict[str, Any]:
    """One window of load while `job` runs in a thread beside it (for as long, as it is
    given to), then what the job returned, merged in."""
    done: list[dict[str, Any]] = []
    thread = None
    if job is not None:
        thread = threading.Thread(target=lambda: done.append(job()))
        thread.start()
    measured = window(engine, port, secret, args, work, name)
    if thread is not None:
        thread.join()
        measured.update(done[0])
    return measured


def purge_window(
    engine: Engine,
    port: int,
    secret: str,
    args: argparse.Namespace,
    work: Path,
    name: str,
    retention_days: int = RETENTION_DAYS,
) -> dict[str, Any]:
    """One window of load while the purge runs for that long (beat's task does the same with
    PURGE_RUN_SECONDS), then the purge's share of it. By day, it starts a few seconds into
    the window, so that whatever it does falls inside the window."""

    def run() -> dict[str, Any]:
        if args.bodies == "days":
            time.sleep(min(5.0, args.window / 4))
        started = time.monotonic()
        result = purge(
            make_sessionmaker(engine),
            retention_days=retention_days,
            batch_size=args.batch_size,
            pause_seconds=args.pause,
            run_seconds=args.window,
        )
        return {
            "purge_seconds": round(time.monotonic() - started, 3),
            "purged_events": result.events,
            "purged_bytes": result.bytes,
            "purged_days": result.days,
            "purge_complete": result.complete,
        }

    return window_beside(engine, port, secret, args, work, name, run)


def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
    }


def sign_test(above: int, n: int) -> float:
    """Two-sided p of `above` of `n` coin flips or a more lopsided count (exact binomial)."""
    if n == 0:
        return 1.0
    extreme = max(above, n - above)
    tail = sum(math.comb(n, k) for k in range(extreme, n + 1)) / 2.0**n
    return min(1.0, 2 * tail)


def above_neighbours(diffs: list[float]) -> tuple[int, float]:
    """How many of these window-minus-neighbours differences are above zero, and the sign
    test's p of that count over the differences that are not zero (a tie says nothing)."""
    above = sum(d > 0 for d in diffs)
    return above, sign_test(above, sum(d != 0 for d in diffs))


def summarize(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per kind of window, the median [min-max] of the windows' p50 and p99, and the verdict.

    The verdict is paired, so that the machine's drift over the run (other work starting or
    ending) does not count for or against the purge: each purge window's figure minus the
    mean of the two stopped windows beside it. The noise is the same difference for the
    windows before and after the purge that have stopped windows on both sides, where
    nothing differs. The purge is within noise when both hold: the purge windows' median
    difference falls within the range of those, and a sign test does not tell the purge
    windows apart from their neighbours (with no effect, each is above them half the time:
    two-sided p >= 0.05 over how many were above). The range alone grows with the noise
    windows' count and the machine's outliers, while the purge's shift is a median over a
    hundred windows: a small shift that nearly every purge window shows is no noise.
    """
    kinds: dict[str, Any] = {}
    for kind in ("before", "during", "between", "after"):
        chosen = [w for w in windows if w["kind"] == kind]
        if chosen:
            kinds[kind] = {
                "windows": len(chosen),
                **{q: spread([w["latency_ms"][q] for w in chosen]) for q in ("p50", "p90", "p99")},
                "checkpoints": sum(w["checkpoints"] for w in chosen),
                "autovacuums": sum(w["autovacuums"] for w in chosen),
            }
    verdict: dict[str, Any] = {}
    for q in ("p50", "p99"):
        purge_diffs, noise_diffs = [], []
        for i in range(1, len(windows) - 1):
            here, left, right = windows[i], windows[i - 1], windows[i + 1]
            if "during" in (left["kind"], right["kind"]):
                continue
            diff = here["latency_ms"][q] - (left["latency_ms"][q] + right["latency_ms"][q]) / 2
            if here["kind"] == "during":
                purge_diffs.append(diff)
            elif here["kind"] == left["kind"] == right["kind"]:
                noise_diffs.append(diff)
        if purge_diffs and noise_diffs:
            paired, noise = spread(purge_diffs), spread(noise_diffs)
            above, sign_p = above_neighbours(purge_diffs)
            verdict[q] = {
                "purge_minus_neighbours_ms": paired,
                "noise_ms": noise,
                "purge_windows_above_neighbours": [above, len(purge_diffs)],
                "sign_test_p": float(f"{sign_p:.3g}"),
                "within_noise": noise["min"] <= paired["median"] <= noise["max"] and sign_p >= 0.05,
            }
    return {"kinds": kinds, "verdict": verdict}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument(
        "--bodies",
        choices=("days", "rows"),
        default="days",
        help="bodies in days' partitions (since migration 0008) or in the rows (before)",
    )
    parser.add_argument("--days", type=int, default=30, help="days the rows are spread over")
    parser.add_argument("--rate", type=int, default=100, help="ingest requests per second")
    parser.add_argument("--window", type=float, default=20.0, help="seconds per window")
    parser.add_argument(
        "--baseline", type=int, default=5, help="windows before (and after) the purge"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULTS["purge_batch_size"].default,
        help="PURGE_BATCH_SIZE",
    )
    parser.add_argument(
        "--pause",
        type=float,
        default=DEFAULTS["purge_pause_seconds"].default,
        help="PURGE_PAUSE_SECONDS: seconds between batches",
    )
    parser.add_argument("--no-erasure", action="store_true", help="skip the erasure timing")
    parser.add_argument(
        "--resummarize",
        type=Path,
        metavar="JSON",
        help="run nothing: judge a saved run again from its windows, rewrite it, print it",
    )
    args = parser.parse_args(argv)
    if args.resummarize:
        saved = json.loads(args.resummarize.read_text())
        saved.update(summarize(saved["windows"]))
        args.resummarize.write_text(json.dumps(saved, indent=2) + "\n")
        print(table(saved))
        return 0

    windows: list[dict[str, Any]] = []
    with rig("bench-purge-") as bench:
        work, engine, secret = bench.work, bench.engine, bench.secret
        began = time.monotonic()
        ages: list[int] = []
        if args.bodies == "days":
            table_bytes, ages = seed_days(engine, args.rows, args.days)
        else:
            table_bytes = seed(engine, args.rows)
        progress(f"seeded {args.rows} rows ({table_bytes / 1e6:.0f} MB of bodies)", began)
        erasure = None if args.no_erasure else time_erasure(engine, in_days=args.bodies == "days")
        if erasure:
            progress(f"erasure: {erasure}", began)
        checkpoint(engine)
        with ingest(bench) as port:

            def add(kind: str, measured: dict[str, Any]) -> dict[str, Any]:
                windows.append({"kind": kind, **measured})
                lat = measured["latency_ms"]
                extra = ""
                if "purged_events" in measured:
                    extra = f", purged {measured['purged_events']}"
                progress(
                    f"window {len(windows)} {kind}: p50 {lat['p50']:.1f} p99 {lat['p99']:.1f} ms"
                    f", {measured['checkpoints']} checkpoint(s){extra}",
                    began,
                )
                return measured

            for _ in range(args.baseline):
                add("before", window(engine, port, secret, args, work, f"w{len(windows)}"))
            purge_started = time.monotonic()
            purged = {"events": 0, "bytes": 0, "seconds": 0.0, "days": 0}
            # By day: the oldest day first, each window's retention one day shorter, so that
            # each run finds exactly one more day old enough (after 01:00 UTC: a day goes
            # once it ended an hour, LATE, before the cutoff).
            retentions = iter([age - 1 for age in ages])
            while True:
                retention = next(retentions, RETENTION_DAYS)
                done = add(
                    "during",
                    purge_window(engine, port, secret, args, work, f"w{len(windows)}", retention),
                )
                purged["events"] += done["purged_events"]
                purged["bytes"] += done["purged_bytes"]
                purged["seconds"] += done["purge_seconds"]
                purged["days"] += done["purged_days"]
                if done["purge_complete"] and (
                    args.bodies == "rows" or purged["days"] >= len(ages)
                ):
                    break
                add("between", window(engine, port, secret, args, work, f"w{len(windows)}"))
            purge_wall = time.monotonic() - purge_started
            for _ in range(args.baseline):
                add("after", window(engine, port, secret, args, work, f"w{len(windows)}"))
        with engine.connect() as conn:
            seeded = "msg_seed_%"
            left = (
                conn.execute(
                    select(func.count()).where(
                        WebhookEvent.body.is_not(None), WebhookEvent.webhook_id.like(seeded)
                    )
                ).scalar_one()
                + conn.execute(
                    select(func.count())
                    .select_from(EventBody)
                    .where(EventBody.webhook_id.like(seeded))
                ).scalar_one()
            )
    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": args.rows,
        "bodies": args.bodies,
        "days": len(ages),
        "seeded_table_bytes": table_bytes,
        "batch_size": args.batch_size,
        "pause_seconds": args.pause,
        "rate": args.rate,
        "window_s": args.window,
        "cpus": len(os.sched_getaffinity(0)),
        "load_average": os.getloadavg(),
        "seeded_bodies_left_after": int(left),
        "purge": {
            **purged,
            "seconds": round(purged["seconds"], 1),
            "wall_seconds_with_stops": round(purge_wall, 1),
            "rows_per_second": round(purged["events"] / max(purged["seconds"], 1e-9)),
        },
        "erasure_of_one_customer_with_20_events": erasure,
        **summarize(windows),
        "windows": windows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    return 0


def progress(message: str, began: float) -> None:
    print(f"[purge {time.monotonic() - began:7.1f}s] {message}", file=sys.stderr, flush=True)


def table(report: dict[str, Any]) -> str:
    purged = report["purge"]
    if report.get("bodies", "rows") == "days":
        how = f"bodies in {report['days']} days' partitions, a day a window"
    else:
        how = (
            f"bodies in rows, {report['batch_size']} a transaction, "
            f"{report['pause_seconds']}s pause"
        )
    lines = [
        f"purge of {report['rows']} rows, {how}: {purged['seconds']:.1f} s of purging, "
        f"{purged['rows_per_second']} rows/s, {purged['bytes'] / 1e6:.0f} MB",
        f"ingest offered {report['rate']}/s in windows of {report['window_s']:.0f} s; "
        "per window p50 / p99, median [min-max] over the windows",
        "WINDOWS        N   p50 ms                 p99 ms                 CHECKPOINTS  AUTOVACUUMS",
    ]
    for kind, row in report["kinds"].items():
        cells = [
            f"{row[q]['median']:.1f} [{row[q]['min']:.1f}-{row[q]['max']:.1f}]"
            for q in ("p50", "p99")
        ]
        lines.append(
            f"{kind:<14} {row['windows']:<3} {cells[0]:<22} {cells[1]:<22} "
            f"{row['checkpoints']:<12} {row['autovacuums']}"
        )
    for q, verdict in report["verdict"].items():
        paired, noise = verdict["purge_minus_neighbours_ms"], verdict["noise_ms"]
        above, n = verdict["purge_windows_above_neighbours"]
        lines.append(
            f"{q}, purge window minus the stopped windows beside it: {paired['median']:+.2f} ms "
            f"[{paired['min']:+.2f} to {paired['max']:+.2f}], above them in {above} of {n} "
            f"(sign test p={verdict['sign_test_p']:.3g}); without a purge the same "
            f"difference ranges {noise['min']:+.2f} to {noise['max']:+.2f}: "
            + ("within noise" if verdict["within_noise"] else "OUTSIDE the noise")
        )
    erasure = report["erasure_of_one_customer_with_20_events"]
    if erasure:
        lines.append(
            f"erase-customer (20 events among {report['rows']} bodies): dry run "
            f"{erasure['dry_run_s']}s, real {erasure['real_s']}s"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
