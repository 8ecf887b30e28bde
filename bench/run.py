"""`make bench`: the ingest and the pipeline, each against a floor measured in the same run.

    python -m bench.run [--quick] [--json] [--reps N] [--out DIR] ...

Ingest: wrk replays pre-signed unique deliveries against `gunicorn "ingest:create_app()"`
and against bench/floor_app.py (verify + LPUSH) under the same gunicorn flags; then an
open-loop generator (bench/loadgen.py) offers fixed rates to both for p50/p99 latency.
End to end: N mixed events recorded in the database and signalled as the ingest does
(one drain per queue), drained by `celery -A workers worker -c W`; the floors are a no-op
task per event (bench/floor_celery.py) on the same settings and queues, drained by the same
W, and the drain's own statements from plain psycopg on W connections (bench/floor_db.py).
Then ack-to-applied latency at fixed rates with ingest and workers running, and the drain
time of a large backlog.
Every figure is a median over --reps runs with its min and max; ratios pair the runs of
one repetition. Progress goes to stderr; the table (or --json) to stdout; the results to
bench/results/<timestamp>.json and bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import Engine, func, select, text

from bench import stack
from bench.deliveries import Delivery, new_secret, signed_deliveries, write_requests
from bench.floor_celery import NOOP, make_floor_celery
from ingest.publisher import DirectPublisher
from shared.bodies import ensure_ahead
from shared.catalog import queue_for
from shared.db import insert_for, make_engine, utcnow
from shared.models import Base, EventBody, EventStatus, WebhookEvent
from shared.queue import make_celery
from shared.settings import load_settings

RESULTS = stack.ROOT / "bench" / "results"
LUA = stack.ROOT / "bench" / "replay.lua"
TARGETS = {
    "ingest_acked_per_s": 1500.0,
    "ingest_ratio_to_floor": 0.5,
    "p99_ms_at_500_per_s": 25.0,
    # A drain applies many events per Celery task: beyond what one task per event can reach.
    "e2e_ratio_to_floor_2_workers": 3.0,
}
# The drain's default batch (shared/settings.py DRAIN_BATCH_SIZE); the database floor's too.
DRAIN_BATCH_SIZE = 100
FINAL = (EventStatus.PROCESSED, EventStatus.IGNORED, EventStatus.DEAD)
NOT_FINAL = (EventStatus.PENDING, EventStatus.PROCESSING, EventStatus.RETRYING)


@dataclass
class Config:
    mode: str
    reps: int
    duration: int
    connections: list[int]
    threads: int
    rates: list[int]
    rate_duration: float
    events: int
    workers: list[int]
    e2e_reps: int
    out: Path
    as_json: bool
    gunicorn_workers: int = stack.GUNICORN_WORKERS
    keep_logs: bool = False
    applied_rates: list[int] = field(default_factory=lambda: [100, 500])
    backlog: int = 0
    database_floor: bool = True
    phases: list[str] = field(default_factory=lambda: ["ingest", "e2e", "applied", "backlog"])
    started: float = field(default_factory=time.monotonic)


def progress(cfg: Config, message: str) -> None:
    print(f"[bench {time.monotonic() - cfg.started:7.1f}s] {message}", file=sys.stderr, flush=True)


def spread(values: Sequence[float]) -> dict[str, float | int]:
    clean = [v for v in values if v == v]  # drop NaN
    if not clean:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {
        "median": round(statistics.median(clean), 3),
        "min": round(min(clean), 3),
        "max": round(max(clean), 3),
        "n": len(clean),
    }


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    return [n / d if d else float("nan") for n, d in zip(numerators, denominators, strict=True)]


# --- facts -------------------------------------------------------------------------------


def command_output(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    return (
        (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr) else ""
    )


def machine_facts() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line),
        platform.processor() or "unknown",
    )
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_kib = int(next(line.split()[1] for line in meminfo if line.startswith("MemTotal:")))
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory_mib": mem_kib // 1024,
        "kernel": platform.release(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def versions(db_url: str) -> dict[str, str]:
    found = {"python": platform.python_version()}
    for dist in (
        "flask",
        "gunicorn",
        "celery",
        "kombu",
        "redis",
        "sqlalchemy",
        "psycopg",
        "standardwebhooks",
        "pydantic",
    ):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "absent"
    found["redis-server"] = command_output(["redis-server", "--version"])
    found["wrk"] = command_output(["wrk", "--version"])
    engine = make_engine(db_url)
    with engine.connect() as conn:
        found["postgresql"] = str(conn.execute(text("SHOW server_version")).scalar())
    engine.dispose()
    found["git_commit"] = command_output(["git", "-C", str(stack.ROOT), "rev-parse", "HEAD"])
    return found


# --- ingest ------------------------------------------------------------------------------


@dataclass
class Services:
    db_url: str
    redis_url: str
    secret: str
    engine: Engine
    redis: redis.Redis
    log_dir: Path
    work_dir: Path
    serial: int = 0

    def env(self) -> dict[str, str]:
        return {
            "DATABASE_URL": self.db_url,
            "REDIS_URL": self.redis_url,
            "DODO_PAYMENTS_WEBHOOK_KEY": self.secret,
            "LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        }

    def run_id(self) -> str:
        self.serial += 1
        return f"b{os.getpid()}x{self.serial}"

    def reset(self) -> None:
        """Empty tables and queues, so every run starts from the same state."""
        names = ", ".join(t.name for t in Base.metadata.sorted_tables)
        with self.engine.begin() as conn:
            conn.execute(text(f"TRUNCATE {names}"))
        self.redis.flushdb()

    def recorded(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(WebhookEvent)).scalar_one())


def run_wrk(
    cfg: Config, svc: Services, port: int, server_pid: int, connections: int, unique: int
) -> dict[str, Any]:
    prefix = svc.work_dir / f"wrk-{svc.serial}"
    write_requests(
        prefix, unique, svc.secret, host=f"127.0.0.1:{port}", run=svc.run_id(), parts=cfg.threads
    )
    argv = ["wrk", "-t", str(cfg.threads), "-c", str(connections), "-d", f"{int(cfg.duration)}s"]
    argv += ["--timeout", "10s", "-s", str(LUA), f"http://127.0.0.1:{port}", "--", str(prefix)]
    workers = stack.children(server_pid)
    cpu_before, pg_before = stack.cpu_seconds(workers), stack.postgres_cpu_seconds()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=cfg.duration + 120)
    cpu_used = stack.cpu_seconds(workers) - cpu_before
    pg_used = stack.postgres_cpu_seconds() - pg_before
    for k in range(cfg.threads):
        Path(f"{prefix}.{k}").unlink(missing_ok=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{done.stdout}\n{done.stderr}")
    result: dict[str, Any] = json.loads(line.removeprefix("WRK_JSON "))
    seconds = result["duration_us"] / 1e6
    result["acked_per_s"] = result["acked"] / seconds
    result["requests_per_s"] = result["requests"] / seconds
    # CPU of the gunicorn workers per answered request: steadier than a rate on a shared box.
    result["worker_cpu_ms_per_request"] = 1000 * cpu_used / max(result["requests"], 1)
    # PostgreSQL's share of the same two cores (the floor uses none).
    result["postgres_cpu_ms_per_request"] = 1000 * pg_used / max(result["requests"], 1)
    return result


def run_loadgen(cfg: Config, svc: Services, port: int, rate: int) -> dict[str, Any]:
    prefix = svc.work_dir / f"fixed-{svc.serial}"
    n = int(rate * cfg.rate_duration) + 1
    write_requests(prefix, n, svc.secret, host=f"127.0.0.1:{port}", run=svc.run_id(), parts=1)
    argv = [sys.executable, "-m", "bench.loadgen", "--requests", str(prefix)]
    argv += ["--port", str(port), "--rate", str(rate), "--duration", str(cfg.rate_duration)]
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=cfg.rate_duration + 120,
        cwd=stack.ROOT,
        env={**os.environ, "PYTHONPATH": str(stack.ROOT)},
    )
    Path(f"{prefix}.0").unlink(missing_ok=True)
    if done.returncode != 0:
        raise RuntimeError(f"loadgen failed:\n{done.stdout}\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def settle(port: int, timeout: float = 120.0) -> None:
    """Wait until the server has worked off what an overloaded run left in its backlog."""
    deadline = time.monotonic() + timeout
    fast = 0
    while fast < 3 and time.monotonic() < deadline:
        began = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                sock.recv(64)
        except OSError:
            pass
        fast = fast + 1 if time.monotonic() - began < 0.05 else 0
        time.sleep(0.1)


def worker_peaks(gunicorn: stack.ManagedProcess) -> dict[str, Any]:
    workers = stack.children(gunicorn.pid)
    peaks = [p for p in (stack.peak_rss_kib(pid) for pid in workers) if p is not None]
    return {"master_kib": stack.peak_rss_kib(gunicorn.pid), "workers_kib": peaks}


def ingest_phase(cfg: Config, svc: Services) -> dict[str, Any]:
    apps = {
        "floor": "bench.floor_app:create_app()",
        "ingest": "ingest:create_app()",
        # Saturation only: the floor plus the durable INSERT, for reference (bench/floor_app.py).
        "durable": "bench.floor_app:create_durable_app()",
    }
    sat: dict[int, dict[str, list[dict[str, Any]]]] = {
        c: {name: [] for name in apps} for c in cfg.connections
    }
    at_rates = ["floor", "ingest"]
    fixed: dict[int, dict[str, list[dict[str, Any]]]] = {
        r: {name: [] for name in at_rates} for r in cfg.rates
    }
    best_seen = {name: 0.0 for name in apps}
    with ExitStack() as stack_:
        procs = {
            name: stack_.enter_context(
                stack.gunicorn(app, svc.env(), svc.log_dir, name, cfg.gunicorn_workers)
            )
            for name, app in apps.items()
        }
        ports = {name: proc.port for name, proc in procs.items()}  # type: ignore[attr-defined]
        progress(cfg, f"gunicorn up: {' '.join(f'{n}=:{p}' for n, p in ports.items())}")
        for name in apps if cfg.mode == "full" else ():
            # Warm-up, not recorded: imports, pools and connections settle.
            svc.reset()
            run_wrk(cfg, svc, ports[name], procs[name].pid, cfg.connections[0], 2000)
        for rep in range(cfg.reps):
            order = list(apps) if rep % 2 == 0 else list(reversed(apps))
            for c in cfg.connections:
                for name in order:
                    svc.reset()
                    unique = int(cfg.duration * max(4000, 2 * best_seen[name]))
                    result = run_wrk(cfg, svc, ports[name], procs[name].pid, c, unique)
                    if name != "floor":
                        result["recorded"] = svc.recorded()
                    best_seen[name] = max(best_seen[name], result["acked_per_s"])
                    sat[c][name].append(result)
                    progress(
                        cfg,
                        f"saturation rep {rep + 1}/{cfg.reps} -c {c:<3} {name:<7} "
                        f"{result['acked_per_s']:8.1f} acked/s  "
                        f"(non-202: {result['requests'] - result['acked']}, "
                        f"socket errors: {sum(result['errors'].values())})",
                    )
        for rep in range(cfg.reps):
            order = at_rates if rep % 2 == 0 else list(reversed(at_rates))
            for rate in cfg.rates:
                for name in order:
                    svc.reset()
                    result = run_loadgen(cfg, svc, ports[name], rate)
                    fixed[rate][name].append(result)
                    settle(ports[name])
                    lat = result["latency_ms"]
                    progress(
                        cfg,
                        f"fixed rate rep {rep + 1}/{cfg.reps} {rate:>5}/s {name:<6} "
                        f"p50 {lat['p50']:7.2f} ms  p99 {lat['p99']:8.2f} ms  "
                        f"achieved {result['achieved_rate']:.0f}/s",
                    )
        rss = {name: worker_peaks(proc) for name, proc in procs.items()}
    return summarize_ingest(cfg, sat, fixed, rss)


def summarize_ingest(
    cfg: Config,
    sat: dict[int, dict[str, list[dict[str, Any]]]],
    fixed: dict[int, dict[str, list[dict[str, Any]]]],
    rss: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    saturation: dict[str, Any] = {}
    for c, runs in sat.items():
        ingest = [r["acked_per_s"] for r in runs["ingest"]]
        floor = [r["acked_per_s"] for r in runs["floor"]]
        saturation[str(c)] = {
            "ingest_acked_per_s": spread(ingest),
            "floor_acked_per_s": spread(floor),
            "ratio": spread(ratios(ingest, floor)),
            "ingest_cpu_ms_per_request": spread(
                [r["worker_cpu_ms_per_request"] for r in runs["ingest"]]
            ),
            "floor_cpu_ms_per_request": spread(
                [r["worker_cpu_ms_per_request"] for r in runs["floor"]]
            ),
            "cpu_ratio": spread(
                ratios(
                    [r["worker_cpu_ms_per_request"] for r in runs["ingest"]],
                    [r["worker_cpu_ms_per_request"] for r in runs["floor"]],
                )
            ),
            "ingest_postgres_cpu_ms_per_request": spread(
                [r["postgres_cpu_ms_per_request"] for r in runs["ingest"]]
            ),
            "durable_floor_acked_per_s": spread([r["acked_per_s"] for r in runs["durable"]]),
            "ratio_to_durable_floor": spread(
                ratios(ingest, [r["acked_per_s"] for r in runs["durable"]])
            ),
            "durable_floor_ratio_to_floor": spread(
                ratios([r["acked_per_s"] for r in runs["durable"]], floor)
            ),
            "durable_floor_cpu_ms_per_request": spread(
                [r["worker_cpu_ms_per_request"] for r in runs["durable"]]
            ),
            "durable_floor_postgres_cpu_ms_per_request": spread(
                [r["postgres_cpu_ms_per_request"] for r in runs["durable"]]
            ),
            "ingest_wrk_p99_ms": spread([r["latency_us"]["p99"] / 1000 for r in runs["ingest"]]),
            "floor_wrk_p99_ms": spread([r["latency_us"]["p99"] / 1000 for r in runs["floor"]]),
            "ingest_non_202": sum(r["requests"] - r["acked"] for r in runs["ingest"]),
            "floor_non_202": sum(r["requests"] - r["acked"] for r in runs["floor"]),
            "ingest_recorded_equals_acked": all(
                r["recorded"] >= r["acked"] for r in runs["ingest"]
            ),
            "durable_floor_recorded_equals_acked": all(
                r["recorded"] >= r["acked"] for r in runs["durable"]
            ),
            "runs": runs,
        }
    best_c = max(sat, key=lambda c: saturation[str(c)]["ingest_acked_per_s"]["median"])
    fixed_out: dict[str, Any] = {}
    for rate, runs in fixed.items():
        entry: dict[str, Any] = {}
        for name in ("ingest", "floor"):
            entry[name] = {
                "p50_ms": spread([r["latency_ms"]["p50"] for r in runs[name]]),
                "p99_ms": spread([r["latency_ms"]["p99"] for r in runs[name]]),
                "max_ms": spread([r["latency_ms"]["max"] for r in runs[name]]),
                "achieved_per_s": spread([r["achieved_rate"] for r in runs[name]]),
                "non_202": sum(
                    r["completed"] - r["statuses"].get("202", 0) + r["errors"] for r in runs[name]
                ),
                "unanswered": sum(r.get("unfinished", 0) + r["shed"] for r in runs[name]),
                # Offered more than it can take: the latencies are those of a growing queue.
                "overloaded": any(
                    r["achieved_rate"] < 0.95 * r["offered_rate"] for r in runs[name]
                ),
                "generator_max_lag_ms": spread([r["generator_max_lag_ms"] for r in runs[name]]),
            }
        entry["p99_ratio_ingest_to_floor"] = spread(
            ratios(
                [r["latency_ms"]["p99"] for r in runs["ingest"]],
                [r["latency_ms"]["p99"] for r in runs["floor"]],
            )
        )
        entry["runs"] = runs
        fixed_out[str(rate)] = entry
    best = saturation[str(best_c)]
    return {
        "saturation": saturation,
        "best": {
            "connections": best_c,
            "ingest_acked_per_s": best["ingest_acked_per_s"],
            "floor_acked_per_s": best["floor_acked_per_s"],
            "ratio": best["ratio"],
        },
        "fixed_rate": fixed_out,
        "peak_rss": rss,
    }


# --- end to end --------------------------------------------------------------------------


def record(svc: Services, deliveries: list[Delivery]) -> None:
    """The rows record_delivery writes, received one microsecond apart in delivery order:
    the event rows, and their bodies and headers in their day's partition."""
    now = utcnow()
    rows = [
        {
            "webhook_id": d.webhook_id,
            "type": d.event_type,
            "status": EventStatus.PENDING,
            "attempts": 0,
            "last_error": None,
            "webhook_ts": d.webhook_ts,
            "event_at": d.occurred,
            "received_at": now + timedelta(microseconds=i),
            "enqueued_at": now,
        }
        for i, d in enumerate(deliveries)
    ]
    bodies = [
        {
            "webhook_id": d.webhook_id,
            "stored_at": row["received_at"],
            "body": d.body,
            "headers": d.headers,
        }
        for d, row in zip(deliveries, rows, strict=True)
    ]
    ensure_ahead(svc.engine, now)
    insert = insert_for(svc.engine)
    with svc.engine.begin() as conn:
        for start in range(0, len(rows), 1000):
            conn.execute(insert(WebhookEvent), rows[start : start + 1000])
            conn.execute(insert(EventBody), bodies[start : start + 1000])


def record_and_queue(svc: Services, deliveries: list[Delivery]) -> None:
    """The ingest's two writes without HTTP: the rows, then its wake signal per delivery."""
    record(svc, deliveries)
    settings = load_settings(database_url=svc.db_url, redis_url=svc.redis_url, _env_file=None)
    celery = make_celery(settings)
    publisher = DirectPublisher(svc.redis, celery)
    for d in deliveries:
        publisher.send(d.webhook_id, d.event_type)  # one drain message per queue, in effect
    publisher.close()
    celery.close()


def database_floor(svc: Services, deliveries: list[Delivery], connections: int) -> dict[str, Any]:
    """The drain's statements from plain psycopg (bench/floor_db.py), on the same backlog."""
    from bench import floor_db  # the drain's functions: absent from a tree before the drain

    record(svc, deliveries)
    batches = floor_db.capture(svc.db_url, DRAIN_BATCH_SIZE)
    svc.reset()
    record(svc, deliveries)
    pg_before = stack.postgres_cpu_seconds()
    seconds = floor_db.replay(svc.db_url.replace("+psycopg", ""), batches, connections)
    pg_used = stack.postgres_cpu_seconds() - pg_before
    n = sum(b.events for b in batches)
    return {
        "events": n,
        "batches": len(batches),
        "complete": n == len(deliveries),
        "seconds": round(seconds, 3),
        "events_per_s": n / seconds,
        "postgres_cpu_ms_per_event": 1000 * pg_used / max(n, 1),
        "statements_per_event": sum(len(b.apply) + len(b.claim) for b in batches) / max(n, 1),
    }


def queue_floor(svc: Services, deliveries: list[Delivery]) -> None:
    celery = make_floor_celery(svc.redis_url)
    with celery.producer_or_acquire() as producer:
        for d in deliveries:
            celery.send_task(
                NOOP, args=[d.webhook_id], queue=queue_for(d.event_type), producer=producer
            )
    celery.close()


def product_done(svc: Services, n: int) -> Callable[[], bool]:
    # Polled every 0.1 s on the database the workers use: an index probe for an event not
    # final yet, and the count only once there is none (counting 10,000 rows each time was
    # PostgreSQL CPU charged to the product; the floor's poll is a Redis LLEN).
    waiting = select(WebhookEvent.webhook_id).where(WebhookEvent.status.in_(NOT_FINAL)).limit(1)

    def check() -> bool:
        with svc.engine.connect() as conn:
            if conn.execute(waiting).first() is not None:
                return False
            done = conn.execute(
                select(func.count()).where(WebhookEvent.status.in_(FINAL))
            ).scalar_one()
        return int(done) >= n

    return check


def floor_done(svc: Services) -> Callable[[], bool]:
    def check() -> bool:
        waiting = 0
        for key in svc.redis.scan_iter(count=1000):
            if svc.redis.type(key) == b"list":
                waiting += int(svc.redis.llen(key))
        return waiting == 0 and int(svc.redis.hlen("unacked")) == 0

    return check


def drain(
    cfg: Config,
    svc: Services,
    kind: str,
    workers: int,
    n: int,
    done: Callable[[], bool],
    *,
    app: str | None = None,
) -> dict[str, Any]:
    """Start `celery -A <app> worker -c W` on what is queued; time it until `done()`.

    `app`: the product's (`workers`) for kind "product", the floor's otherwise, unless given
    (bench/batches.py drains with celery-batches)."""
    app = app or ("workers" if kind == "product" else "bench.floor_celery")
    name = f"{kind}-{workers}w-{svc.serial}"
    with stack.celery_worker(app, workers, svc.env(), svc.log_dir, name) as proc:
        started = time.monotonic()
        processes = [proc.pid, *stack.children(proc.pid)]
        cpu_before, pg_before = stack.cpu_seconds(processes), stack.postgres_cpu_seconds()
        main_before = stack.cpu_seconds([proc.pid])
        deadline = started + max(300.0, n / 5)
        finished = None
        while time.monotonic() < deadline:
            if done():
                finished = time.monotonic()
                break
            time.sleep(0.1)
        cpu_used = stack.cpu_seconds(processes) - cpu_before
        main_used = stack.cpu_seconds([proc.pid]) - main_before
        pg_used = stack.postgres_cpu_seconds() - pg_before
        pool = stack.children(proc.pid)
        rss = {
            "main_kib": stack.peak_rss_kib(proc.pid),
            "children_kib": [p for p in (stack.peak_rss_kib(c) for c in pool) if p is not None],
        }
    elapsed = (finished or time.monotonic()) - started
    return {
        "events": n,
        "complete": finished is not None,
        "seconds": round(elapsed, 3),
        "events_per_s": n / elapsed if finished else float("nan"),
        # Celery main process and pool children; the database's own CPU is not in it.
        "worker_cpu_ms_per_event": 1000 * cpu_used / n,
        # Its share in the main process: consuming, acknowledging, handing tasks to the pool.
        "main_cpu_ms_per_event": 1000 * main_used / n,
        # The database's, its polling by this bench included (product only).
        "postgres_cpu_ms_per_event": 1000 * pg_used / n,
        "peak_rss": rss,
    }


def outcome_counts(svc: Services) -> dict[str, int]:
    with svc.engine.connect() as conn:
        rows = conn.execute(
            select(WebhookEvent.status, func.count()).group_by(WebhookEvent.status)
        ).all()
        window = conn.execute(
            select(func.min(WebhookEvent.processed_at), func.max(WebhookEvent.processed_at))
        ).one()
    counts = {str(status): int(count) for status, count in rows}
    if window[0] and window[1]:
        counts["processed_at_window_ms"] = int((window[1] - window[0]).total_seconds() * 1000)
    return counts


def e2e_phase(cfg: Config, svc: Services) -> dict[str, Any]:
    runs: dict[int, dict[str, list[dict[str, Any]]]] = {
        w: {"product": [], "floor": [], "database": []} for w in cfg.workers
    }
    for rep in range(cfg.e2e_reps):
        for w in cfg.workers:
            order = ["floor", "product", "database"]
            order = order if rep % 2 == 0 else list(reversed(order))
            for kind in order:
                svc.reset()
                deliveries = list(signed_deliveries(cfg.events, svc.secret, run=svc.run_id()))
                if kind == "database":
                    if not cfg.database_floor:
                        continue
                    result = database_floor(svc, deliveries, w)
                elif kind == "product":
                    record_and_queue(svc, deliveries)
                    result = drain(cfg, svc, kind, w, cfg.events, product_done(svc, cfg.events))
                    result["statuses"] = outcome_counts(svc)
                else:
                    queue_floor(svc, deliveries)
                    result = drain(cfg, svc, kind, w, cfg.events, floor_done(svc))
                runs[w][kind].append(result)
                progress(
                    cfg,
                    f"end to end rep {rep + 1}/{cfg.e2e_reps} {w} worker(s) {kind:<7} "
                    f"{result['events_per_s']:8.1f} events/s "
                    f"({cfg.events} in {result['seconds']} s)"
                    + (f" {result['statuses']}" if kind == "product" else ""),
                )

    out: dict[str, Any] = {}
    for w, by_kind in runs.items():
        product = [r["events_per_s"] for r in by_kind["product"]]
        floor = [r["events_per_s"] for r in by_kind["floor"]]
        database = [r["events_per_s"] for r in by_kind["database"]]
        out[str(w)] = {
            "product_events_per_s": spread(product),
            "floor_events_per_s": spread(floor),
            "ratio": spread(ratios(product, floor)),
            "database_floor_events_per_s": spread(database),
            "ratio_to_database_floor": spread(ratios(product, database) if database else []),
            "database_floor_postgres_cpu_ms_per_event": spread(
                [r["postgres_cpu_ms_per_event"] for r in by_kind["database"]]
            ),
            "product_cpu_ms_per_event": spread(
                [r["worker_cpu_ms_per_event"] for r in by_kind["product"]]
            ),
            "floor_cpu_ms_per_event": spread(
                [r["worker_cpu_ms_per_event"] for r in by_kind["floor"]]
            ),
            "product_postgres_cpu_ms_per_event": spread(
                [r["postgres_cpu_ms_per_event"] for r in by_kind["product"]]
            ),
            "all_complete": all(
                r["complete"] for r in by_kind["product"] + by_kind["floor"] + by_kind["database"]
            ),
            "peak_rss": {
                "product_main_kib": max(r["peak_rss"]["main_kib"] or 0 for r in by_kind["product"]),
                "product_child_kib": max(
                    max(r["peak_rss"]["children_kib"] or [0]) for r in by_kind["product"]
                ),
                "floor_main_kib": max(r["peak_rss"]["main_kib"] or 0 for r in by_kind["floor"]),
                "floor_child_kib": max(
                    max(r["peak_rss"]["children_kib"] or [0]) for r in by_kind["floor"]
                ),
            },
            "runs": by_kind,
        }
    return out


def applied_phase(cfg: Config, svc: Services) -> dict[str, Any]:
    """From acknowledgement to applied: the ingest and 2 worker processes running, fixed
    offered rates (bench/loadgen.py); per event, `processed_at - received_at` (received_at is
    taken just before the INSERT, so this is at most a millisecond longer than from the 2xx)."""
    runs: dict[int, list[dict[str, Any]]] = {r: [] for r in cfg.applied_rates}
    with (
        stack.gunicorn("ingest:create_app()", svc.env(), svc.log_dir, "applied") as ingest,
        stack.celery_worker("workers", 2, svc.env(), svc.log_dir, f"applied-{svc.serial}"),
    ):
        port = ingest.port  # type: ignore[attr-defined]
        # Warm-up, not recorded: every worker process connects and compiles its statements.
        svc.reset()
        warm = run_loadgen(cfg, svc, port, 50)
        check = product_done(svc, int(warm["statuses"].get("202", 0)))
        wait_until_true(check, 60)
        for rep in range(cfg.reps):
            for rate in cfg.applied_rates:
                svc.reset()
                result = run_loadgen(cfg, svc, port, rate)
                acked = int(result["statuses"].get("202", 0))
                wait_until_true(product_done(svc, acked), 120)
                with svc.engine.connect() as conn:
                    waits = sorted(
                        1000 * (done - got).total_seconds()  # type: ignore[operator]
                        for got, done in conn.execute(
                            select(WebhookEvent.received_at, WebhookEvent.processed_at).where(
                                WebhookEvent.processed_at.is_not(None)
                            )
                        )
                    )
                entry = {
                    "offered_per_s": rate,
                    "acked": acked,
                    "applied": len(waits),
                    "p50_ms": percentile(waits, 50),
                    "p99_ms": percentile(waits, 99),
                    "max_ms": waits[-1] if waits else float("nan"),
                    "ack_p99_ms": result["latency_ms"]["p99"],
                }
                runs[rate].append(entry)
                progress(
                    cfg,
                    f"ack to applied rep {rep + 1}/{cfg.reps} {rate:>4}/s: p50 "
                    f"{entry['p50_ms']:.1f} ms p99 {entry['p99_ms']:.1f} ms "
                    f"({entry['applied']}/{acked} applied)",
                )
    return {
        str(rate): {
            "p50_ms": spread([r["p50_ms"] for r in by_rate]),
            "p99_ms": spread([r["p99_ms"] for r in by_rate]),
            "max_ms": spread([r["max_ms"] for r in by_rate]),
            "all_applied": all(r["applied"] == r["acked"] for r in by_rate),
            "runs": by_rate,
        }
        for rate, by_rate in runs.items()
    }


def wait_until_true(check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.1)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def backlog_phase(cfg: Config, svc: Services) -> dict[str, Any]:
    """A backlog of cfg.backlog events recorded at once (a day of Dodo's retries), drained by
    2 worker processes: the seconds it took and the workers' peak RSS."""
    svc.reset()
    deliveries = list(signed_deliveries(cfg.backlog, svc.secret, run=svc.run_id()))
    record_and_queue(svc, deliveries)
    del deliveries
    result = drain(cfg, svc, "product", 2, cfg.backlog, product_done(svc, cfg.backlog))
    result["statuses"] = outcome_counts(svc)
    progress(
        cfg,
        f"backlog of {cfg.backlog}: {result['seconds']} s ({result['events_per_s']:.0f}/s), "
        f"peak RSS {result['peak_rss']}",
    )
    return result


# --- report ------------------------------------------------------------------------------


def fmt(s: dict[str, Any], digits: int = 0) -> str:
    if not s.get("n"):
        return "n/a"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def targets(results: dict[str, Any]) -> dict[str, Any]:
    best = results["ingest"]["best"]
    fixed500 = results["ingest"]["fixed_rate"].get("500")
    e2e2 = results["e2e"].get("2")
    return {
        "ingest_acked_per_s": {
            "target": f">= {TARGETS['ingest_acked_per_s']:.0f}",
            "measured": best["ingest_acked_per_s"]["median"],
            "met": best["ingest_acked_per_s"]["median"] >= TARGETS["ingest_acked_per_s"],
        },
        "ingest_ratio_to_floor": {
            "target": f">= {TARGETS['ingest_ratio_to_floor']}",
            "measured": best["ratio"]["median"],
            "met": best["ratio"]["median"] >= TARGETS["ingest_ratio_to_floor"],
        },
        "p99_ms_at_500_per_s": {
            "target": f"< {TARGETS['p99_ms_at_500_per_s']:.0f}",
            "measured": fixed500["ingest"]["p99_ms"]["median"] if fixed500 else None,
            "met": bool(
                fixed500 and fixed500["ingest"]["p99_ms"]["median"] < TARGETS["p99_ms_at_500_per_s"]
            ),
        },
        "e2e_ratio_to_floor_2_workers": {
            "target": f">= {TARGETS['e2e_ratio_to_floor_2_workers']}",
            "measured": e2e2["ratio"]["median"] if e2e2 else None,
            "met": bool(
                e2e2 and e2e2["ratio"]["median"] >= TARGETS["e2e_ratio_to_floor_2_workers"]
            ),
        },
    }


def extra_tables(results: dict[str, Any]) -> str:
    """End to end against the database floor, ack-to-applied latency, the backlog."""
    lines: list[str] = []
    if "e2e" in results:
        lines += [
            "End to end against the database floor (the drain's statements, plain psycopg)",
            f"  {'workers':>7}  {'product':>22}  {'database floor':>22}  {'ratio':>18}",
        ]
        for w, row in results["e2e"].items():
            lines.append(
                f"  {w:>7}  {fmt(row['product_events_per_s']):>22}  "
                f"{fmt(row['database_floor_events_per_s']):>22}  "
                f"{fmt(row['ratio_to_database_floor'], 2):>18}"
            )
    if "applied" in results:
        lines += ["", "From acknowledgement to applied, 2 worker processes (ms)"]
        for rate, row in results["applied"].items():
            lines.append(
                f"  {rate:>5}/s  p50 {fmt(row['p50_ms'], 1):>20}  p99 {fmt(row['p99_ms'], 1):>22}"
                + ("" if row["all_applied"] else "  (NOT ALL APPLIED)")
            )
    if "backlog" in results:
        b = results["backlog"]
        rss = b["peak_rss"]
        lines += [
            "",
            f"Backlog of {b['events']} events, 2 worker processes: {b['seconds']} s "
            f"({b['events_per_s']:.0f}/s); peak RSS main {(rss['main_kib'] or 0) / 1024:.1f} MiB, "
            f"pool children {', '.join(f'{k / 1024:.1f}' for k in rss['children_kib'])} MiB",
        ]
    return "\n".join(lines)


def table(results: dict[str, Any]) -> str:
    if "ingest" not in results or "e2e" not in results:
        return ""
    m, ing, e2e = results["machine"], results["ingest"], results["e2e"]
    lines = [
        f"dodo-webhooks benchmark ({results['mode']}, {results['settings']['reps']} reps, "
        f"{results['settings']['e2e_reps']} end to end; "
        "median [min-max])",
        f"machine: {m['nproc']} cpu, {m['cpu_model']}, {m['memory_mib']} MiB; load "
        f"{m['loadavg_at_start']} -> {m['loadavg_at_end']}",
        f"gunicorn {' '.join(results['settings']['gunicorn_flags'])}; "
        f"wrk -t {results['settings']['wrk_threads']} -d {results['settings']['duration_s']}s",
        "",
        "Ingest at saturation (acknowledged deliveries/s)",
        f"  {'conns':>5}  {'ingest':>22}  {'floor (verify+LPUSH)':>22}  {'ratio':>18}",
    ]
    for c, row in ing["saturation"].items():
        lines.append(
            f"  {c:>5}  {fmt(row['ingest_acked_per_s']):>22}  "
            f"{fmt(row['floor_acked_per_s']):>22}  {fmt(row['ratio'], 2):>18}"
        )
    lines += [
        "",
        "Ingest CPU per request (gunicorn workers, ms)",
        f"  {'conns':>5}  {'ingest':>22}  {'floor':>22}  {'ingest/floor':>18}",
    ]
    for c, row in ing["saturation"].items():
        lines.append(
            f"  {c:>5}  {fmt(row['ingest_cpu_ms_per_request'], 2):>22}  "
            f"{fmt(row['floor_cpu_ms_per_request'], 2):>22}  {fmt(row['cpu_ratio'], 1):>18}"
        )
    lines.append(
        "  PostgreSQL's CPU per ingest request, same cores (ms): "
        + ", ".join(
            f"-c {c} {fmt(row['ingest_postgres_cpu_ms_per_request'], 2)}"
            for c, row in ing["saturation"].items()
        )
    )
    lines += [
        "",
        "For reference: the durable floor (verify + INSERT + LPUSH), acknowledged/s",
        f"  {'conns':>5}  {'durable floor':>22}  {'durable / floor':>18}  {'ingest / durable':>18}",
    ]
    for c, row in ing["saturation"].items():
        lines.append(
            f"  {c:>5}  {fmt(row['durable_floor_acked_per_s']):>22}  "
            f"{fmt(row['durable_floor_ratio_to_floor'], 2):>18}  "
            f"{fmt(row['ratio_to_durable_floor'], 2):>18}"
        )
    lines.append(
        "  its CPU per request, gunicorn workers and PostgreSQL (ms): "
        + ", ".join(
            f"-c {c} {fmt(row['durable_floor_cpu_ms_per_request'], 2)} and "
            f"{fmt(row['durable_floor_postgres_cpu_ms_per_request'], 2)}"
            for c, row in ing["saturation"].items()
        )
    )
    lines += [
        "",
        "Ingest latency at fixed offered rates (open loop, ms from scheduled send)",
        f"  {'rate/s':>6}  {'ingest p50':>18}  {'ingest p99':>20}  {'floor p50':>18}  "
        f"{'floor p99':>20}",
    ]
    for rate, row in ing["fixed_rate"].items():
        lines.append(
            f"  {rate:>6}  {fmt(row['ingest']['p50_ms'], 1):>18}  "
            f"{fmt(row['ingest']['p99_ms'], 1):>20}  {fmt(row['floor']['p50_ms'], 1):>18}  "
            f"{fmt(row['floor']['p99_ms'], 1):>20}"
            + ("  (ingest overloaded)" if row["ingest"]["overloaded"] else "")
        )
    lines += [
        "",
        f"End to end: {results['settings']['events']} mixed events recorded and queued, "
        "drained by celery prefork (events/s)",
        f"  {'workers':>7}  {'product':>22}  {'floor (no-op task)':>22}  {'ratio':>18}",
    ]
    for w, row in e2e.items():
        lines.append(
            f"  {w:>7}  {fmt(row['product_events_per_s']):>22}  "
            f"{fmt(row['floor_events_per_s']):>22}  {fmt(row['ratio'], 2):>18}"
            + ("" if row["all_complete"] else "  (INCOMPLETE)")
        )
    lines.append(
        "  CPU per event (celery main + pool, ms): "
        + ", ".join(
            f"{w}w {fmt(row['product_cpu_ms_per_event'], 2)} vs floor "
            f"{fmt(row['floor_cpu_ms_per_event'], 2)}"
            for w, row in e2e.items()
        )
    )
    lines.append(
        "  PostgreSQL's CPU per event (ms): "
        + ", ".join(
            f"{w}w {fmt(row['product_postgres_cpu_ms_per_event'], 2)}" for w, row in e2e.items()
        )
    )
    rss = results["peak_rss_mib"]
    lines += [
        "",
        "Peak RSS (VmHWM, MiB): " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in rss.items()),
        "",
        "Targets:",
    ]
    for name, t in results["targets"].items():
        measured = t["measured"]
        shown = f"{measured:.2f}" if isinstance(measured, float) else str(measured)
        lines.append(f"  {'met ' if t['met'] else 'MISS'} {name}: {shown} (target {t['target']})")
    return "\n".join(lines)


def peak_rss_mib(results: dict[str, Any]) -> dict[str, float]:
    ing = results["ingest"]["peak_rss"]
    e2e = results["e2e"]
    top = str(max(int(w) for w in e2e))

    def mib(kib: int | None) -> float:
        return round((kib or 0) / 1024, 1)

    return {
        "ingest_worker": mib(max(ing["ingest"]["workers_kib"] or [0])),
        "floor_app_worker": mib(max(ing["floor"]["workers_kib"] or [0])),
        "celery_main": mib(e2e[top]["peak_rss"]["product_main_kib"]),
        "celery_pool_child": mib(e2e[top]["peak_rss"]["product_child_kib"]),
        "floor_celery_pool_child": mib(e2e[top]["peak_rss"]["floor_child_kib"]),
    }


# --- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 rep, small N")
    parser.add_argument("--json", action="store_true", help="print the results JSON on stdout")
    parser.add_argument("--reps", type=int, help="repetitions of every measurement")
    parser.add_argument("--duration", type=int, help="seconds per wrk run")
    parser.add_argument("--connections", help="wrk -c values, comma-separated")
    parser.add_argument("--rates", help="fixed offered rates/s, comma-separated")
    parser.add_argument("--rate-duration", type=float, help="seconds per fixed-rate run")
    parser.add_argument("--events", type=int, help="events per end-to-end run")
    parser.add_argument("--workers", help="celery -c values, comma-separated")
    parser.add_argument("--e2e-reps", type=int, help="repetitions end to end (default: --reps)")
    parser.add_argument(
        "--gunicorn-workers",
        type=int,
        default=stack.GUNICORN_WORKERS,
        help="gunicorn -w for ingest and floor (default: gunicorn.conf.py's, 2 x cores + 1)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--keep-logs", action="store_true", help="keep the process logs")
    parser.add_argument(
        "--phases", help="comma-separated, of ingest,e2e,applied,backlog (default: all)"
    )
    parser.add_argument("--applied-rates", help="offered rates/s for ack-to-applied latency")
    parser.add_argument("--backlog", type=int, help="events in the backlog run (0: none)")
    parser.add_argument(
        "--no-database-floor", action="store_true", help="skip the database floor end to end"
    )
    args = parser.parse_args(argv)
    quick = args.quick

    def ints(value: str | None, default: list[int]) -> list[int]:
        return [int(x) for x in value.split(",")] if value else default

    return Config(
        mode="quick" if quick else "full",
        reps=args.reps or (1 if quick else 3),
        duration=args.duration or (2 if quick else 10),
        connections=ints(args.connections, [16] if quick else [16, 32, 64]),
        threads=2,
        rates=ints(args.rates, [250] if quick else [250, 500, 1000]),
        rate_duration=args.rate_duration or (2.0 if quick else 10.0),
        events=args.events or (500 if quick else 10_000),
        workers=ints(args.workers, [2] if quick else [1, 2, 4]),
        e2e_reps=args.e2e_reps or args.reps or (1 if quick else 3),
        gunicorn_workers=args.gunicorn_workers,
        out=args.out,
        as_json=args.json,
        keep_logs=args.keep_logs,
        applied_rates=ints(args.applied_rates, [100] if quick else [100, 500]),
        backlog=args.backlog if args.backlog is not None else (0 if quick else 100_000),
        database_floor=not args.no_database_floor,
        phases=args.phases.split(",") if args.phases else ["ingest", "e2e", "applied", "backlog"],
    )


@contextmanager
def services(cfg: Config, root: Path) -> Iterator[Services]:
    """The run's own database and redis-server; dropped and stopped afterwards."""
    log_dir = root / "logs"
    log_dir.mkdir()
    with stack.bench_database() as db_url, stack.redis_server(log_dir) as redis_url:
        engine = make_engine(db_url)
        client = redis.Redis.from_url(redis_url)
        try:
            yield Services(db_url, redis_url, new_secret(), engine, client, log_dir, root)
        finally:
            client.close()
            engine.dispose()


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    if shutil.which("wrk") is None:
        print(
            "bench: wrk is not installed; it is the Debian package `wrk`: apt-get install -y wrk",
            file=sys.stderr,
        )
        return 2
    started_at = datetime.now(UTC)
    results: dict[str, Any] = {
        "schema": 1,
        "mode": cfg.mode,
        "started_at": started_at.isoformat(),
        "machine": machine_facts(),
    }
    progress(
        cfg,
        f"{cfg.mode} run: {results['machine']['nproc']} cpu, "
        f"load {results['machine']['loadavg_at_start']}",
    )
    with tempfile.TemporaryDirectory(prefix="dodo-bench-") as tmp:
        root = Path(tmp)
        try:
            with services(cfg, root) as svc:
                results["versions"] = versions(svc.db_url)
                results["settings"] = settings_record(cfg)
                if "ingest" in cfg.phases:
                    progress(cfg, "ingest: saturation (wrk), then fixed rates (open loop)")
                    results["ingest"] = ingest_phase(cfg, svc)
                if "e2e" in cfg.phases:
                    progress(cfg, "end to end: record + queue, then drain with celery")
                    results["e2e"] = e2e_phase(cfg, svc)
                if "applied" in cfg.phases:
                    progress(cfg, "from acknowledgement to applied at fixed offered rates")
                    results["applied"] = applied_phase(cfg, svc)
                if "backlog" in cfg.phases and cfg.backlog:
                    progress(cfg, f"a backlog of {cfg.backlog} events, 2 worker processes")
                    results["backlog"] = backlog_phase(cfg, svc)
        except BaseException:
            kept = Path(tempfile.mkdtemp(prefix="dodo-bench-logs-"))
            shutil.copytree(root / "logs", kept, dirs_exist_ok=True)
            print(f"bench: failed; process logs kept in {kept}", file=sys.stderr)
            raise
        if cfg.keep_logs:
            kept = Path(tempfile.mkdtemp(prefix="dodo-bench-logs-"))
            shutil.copytree(root / "logs", kept, dirs_exist_ok=True)
            progress(cfg, f"process logs kept in {kept}")
    results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["finished_at"] = datetime.now(UTC).isoformat()
    if "ingest" in results and "e2e" in results:
        results["peak_rss_mib"] = peak_rss_mib(results)
        results["targets"] = targets(results)
    cfg.out.mkdir(parents=True, exist_ok=True)
    stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
    text_out = json.dumps(results, indent=2, sort_keys=False, default=str) + "\n"
    (cfg.out / f"{stamp}.json").write_text(text_out)
    (cfg.out / "latest.json").write_text(text_out)
    progress(cfg, f"results: {cfg.out / f'{stamp}.json'} (and latest.json)")
    print(text_out if cfg.as_json else table(results))
    if not cfg.as_json:
        print(extra_tables(results))
    return 0


def settings_record(cfg: Config) -> dict[str, Any]:
    return {
        "reps": cfg.reps,
        "e2e_reps": cfg.e2e_reps,
        "duration_s": cfg.duration,
        "connections": cfg.connections,
        "wrk_threads": cfg.threads,
        "rates": cfg.rates,
        "rate_duration_s": cfg.rate_duration,
        "events": cfg.events,
        "worker_counts": cfg.workers,
        "gunicorn_flags": ["-w", str(cfg.gunicorn_workers), *stack.GUNICORN_FLAGS],
        "gunicorn_conf_py_present": (stack.ROOT / "gunicorn.conf.py").exists(),
        "celery_flags": ["-P", "prefork", *stack.CELERY_FLAGS],
        "log_level": "INFO",
        "redis": "own redis-server, no persistence (--save '' --appendonly no), noeviction",
        "e2e_input": "rows inserted as record_delivery writes them (received 1 us apart), then "
        "the ingest's wake (DirectPublisher.send) per event: one workers.drain per queue",
        "e2e_floor_database": "bench/floor_db.py: the drain's captured statements replayed "
        "from plain psycopg, one connection per worker process, a transaction per batch",
        "event_mix": "30 handled types in rotation, 1 in 10 an SDK-known other type; "
        "distinct ids; refunds/disputes point at a payment of the run; 50 customers",
        "floor_ingest": "bench/floor_app.py: standardwebhooks verify + LPUSH",
        "floor_e2e": "bench/floor_celery.py: no-op task, make_celery settings and queues",
    }


if __name__ == "__main__":
    raise SystemExit(main())
