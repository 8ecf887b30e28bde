"""`make bench-batches`: the product's drain against celery-batches, on one backlog, in one run.

    python -m bench.batches [--events N] [--workers 1,2] [--reps R] [--json] [--out FILE]

Per repetition and worker count W, on the same N recorded mixed events (bench/run.py's
`record`, bench/deliveries.py's mix), in an order that alternates per repetition:
  product  the rows and the ingest's wake per event (`record_and_queue`), drained by
           `celery -A workers worker -c W` (`workers.drain`, batches of DRAIN_BATCH_SIZE);
  batches  the rows and one message per event carrying its webhook id, as the ingest sent
           before the drain, consumed by a `celery_batches.Batches` task
           (bench/batches_worker.py: FLUSH_EVERY = DRAIN_BATCH_SIZE) that claims those ids and
           applies them with the product's batch path (bench/batches_apply.py);
  floor    a no-op task per event on the product's settings (bench/floor_celery.py), as
           bench/run.py measures it, so that both get a ratio to the same floor.
Then ack-to-applied latency at a low offered rate with W=2 workers running, for the product
and for celery-batches (`--latency-rate 0` skips it). Every figure is a median over the
repetitions with its min and max, ratios paired within one repetition. Progress on stderr,
the table (or --json) on stdout, the results in bench/results/batches.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import func, select

from bench import run, stack
from bench.batches_apply import APPLY_MESSAGES, BATCH_LOGGED
from bench.deliveries import Delivery, signed_deliveries
from ingest.publisher import DirectPublisher
from shared.catalog import queue_for
from shared.models import WebhookEvent
from shared.queue import make_celery
from shared.settings import load_settings

RESULT = run.RESULTS / "batches.json"
# `celery -A` of the celery-batches worker; imported by name, so that this module imports
# without celery-batches (main says how to install it).
BATCHES_APP = "bench.batches_worker"
KINDS = ("floor", "product", "batches")


def queue_batches(svc: run.Services, deliveries: list[Delivery]) -> None:
    """One message per event to its family's queue, carrying its webhook id, one producer."""
    settings = load_settings(database_url=svc.db_url, redis_url=svc.redis_url, _env_file=None)
    celery = make_celery(settings)
    with celery.producer_or_acquire() as producer:
        for d in deliveries:
            celery.send_task(
                APPLY_MESSAGES,
                args=[d.webhook_id],
                queue=queue_for(d.event_type),
                producer=producer,
            )
    celery.close()


def outcomes(svc: run.Services) -> dict[str, int]:
    """How many events ended in each status and outcome ("processed/applied": 812, ...)."""
    with svc.engine.connect() as conn:
        rows = conn.execute(
            select(WebhookEvent.status, WebhookEvent.outcome, func.count()).group_by(
                WebhookEvent.status, WebhookEvent.outcome
            )
        ).all()
    return {f"{status}/{outcome or '-'}": int(n) for status, outcome, n in sorted(rows, key=str)}


def batch_sizes(svc: run.Services, workers: int) -> dict[str, float | int]:
    """How many batches the celery-batches worker ran, and how full, from its log."""
    logs = sorted(svc.log_dir.glob(f"celery-batches-{workers}w-*.log"), key=os.path.getmtime)
    sizes = []
    for line in logs[-1].read_text(errors="replace").splitlines():
        if BATCH_LOGGED in line and line.startswith("{"):
            sizes.append(int(json.loads(line)["messages"]))
    return {
        "batches": len(sizes),
        "mean": round(sum(sizes) / len(sizes), 1) if sizes else float("nan"),
        "min": min(sizes, default=0),
        "max": max(sizes, default=0),
    }


def redis_commands(svc: run.Services) -> int:
    return int(svc.redis.info("stats")["total_commands_processed"])


def measure(
    cfg: run.Config, svc: run.Services, kind: str, workers: int, deliveries: list[Delivery]
) -> dict[str, Any]:
    """Queue the backlog as `kind` needs it, drain it with W processes, and check its end."""
    svc.reset()
    n = len(deliveries)
    if kind == "floor":
        run.queue_floor(svc, deliveries)
        before = redis_commands(svc)
        result = run.drain(cfg, svc, kind, workers, n, run.floor_done(svc))
    else:
        if kind == "product":
            run.record_and_queue(svc, deliveries)
        else:
            run.record(svc, deliveries)
            queue_batches(svc, deliveries)
        before = redis_commands(svc)
        app = "workers" if kind == "product" else BATCHES_APP
        result = run.drain(cfg, svc, kind, workers, n, run.product_done(svc, n), app=app)
        result["outcomes"] = outcomes(svc)
        if kind == "batches":
            result["batch_sizes"] = batch_sizes(svc, workers)
    # The workers' commands (and their start and stop, the same for all three); the floor's
    # include this bench's polling of the queue lengths, the others poll PostgreSQL.
    result["redis_commands_per_event"] = (redis_commands(svc) - before) / n
    return result


def throughput(cfg: run.Config, svc: run.Services) -> dict[str, Any]:
    runs: dict[int, dict[str, list[dict[str, Any]]]] = {
        w: {kind: [] for kind in KINDS} for w in cfg.workers
    }
    for rep in range(cfg.e2e_reps):
        for w in cfg.workers:
            order = list(KINDS) if rep % 2 == 0 else list(reversed(KINDS))
            deliveries = list(signed_deliveries(cfg.events, svc.secret, run=svc.run_id()))
            for kind in order:
                result = measure(cfg, svc, kind, w, deliveries)
                runs[w][kind].append(result)
                run.progress(
                    cfg,
                    f"rep {rep + 1}/{cfg.e2e_reps} {w} worker(s) {kind:<7} "
                    f"{result['events_per_s']:8.1f} events/s ({cfg.events} in "
                    f"{result['seconds']} s)"
                    + (f" {result['outcomes']}" if "outcomes" in result else ""),
                )
    return {str(w): summarize(by_kind, cfg.events) for w, by_kind in runs.items()}


def summarize(by_kind: dict[str, list[dict[str, Any]]], n: int) -> dict[str, Any]:
    rate = {kind: [r["events_per_s"] for r in by_kind[kind]] for kind in KINDS}
    applied = [r["outcomes"] for kind in ("product", "batches") for r in by_kind[kind]]
    return {
        **{f"{kind}_events_per_s": run.spread(rate[kind]) for kind in KINDS},
        "product_ratio_to_floor": run.spread(run.ratios(rate["product"], rate["floor"])),
        "batches_ratio_to_floor": run.spread(run.ratios(rate["batches"], rate["floor"])),
        "batches_ratio_to_product": run.spread(run.ratios(rate["batches"], rate["product"])),
        **{
            f"{kind}_{what}": run.spread([r[what] for r in by_kind[kind]])
            for kind in KINDS
            for what in (
                "worker_cpu_ms_per_event",
                "main_cpu_ms_per_event",
                "redis_commands_per_event",
            )
        },
        **{
            f"{kind}_postgres_cpu_ms_per_event": run.spread(
                [r["postgres_cpu_ms_per_event"] for r in by_kind[kind]]
            )
            for kind in ("product", "batches")
        },
        "batches_per_run": run.spread([r["batch_sizes"]["batches"] for r in by_kind["batches"]]),
        "batches_mean_size": run.spread([r["batch_sizes"]["mean"] for r in by_kind["batches"]]),
        "all_complete": all(r["complete"] for kind in KINDS for r in by_kind[kind]),
        # Every event final, and the same outcomes whichever applied them.
        "same_outcomes": all(a == applied[0] for a in applied)
        and sum(v for k, v in applied[0].items() if k.split("/")[0] in run.FINAL) == n,
        "outcomes": applied[0],
        "runs": by_kind,
    }


def offered(
    svc: run.Services, deliveries: list[Delivery], rate: float, signal: Callable[[Delivery], None]
) -> dict[str, Any]:
    """Record and signal each delivery at its scheduled time; the generator's lag."""
    started = time.monotonic()
    lag = 0.0
    for i, d in enumerate(deliveries):
        due = started + i / rate
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        lag = max(lag, time.monotonic() - due)
        run.record(svc, [d])  # received_at is taken here, just before the INSERT
        signal(d)
    return {"offered_per_s": rate, "generator_max_lag_ms": round(1000 * lag, 1)}


def publisher_signal(publisher: DirectPublisher) -> Callable[[Delivery], None]:
    """The ingest's: wake the queue's drain."""

    def signal(d: Delivery) -> None:
        publisher.send(d.webhook_id, d.event_type)

    return signal


def message_signal(celery: Celery) -> Callable[[Delivery], None]:
    """The ingest's before the drain: one message per event, here to the celery-batches task."""

    def signal(d: Delivery) -> None:
        celery.send_task(APPLY_MESSAGES, args=[d.webhook_id], queue=queue_for(d.event_type))

    return signal


def latency(cfg: run.Config, svc: run.Services, rate: float, seconds: float) -> dict[str, Any]:
    """From recorded to applied (`processed_at - received_at`) at a low offered rate, 2
    worker processes running: the drain's wake against celery-batches' flush interval."""
    out: dict[str, Any] = {}
    settings = load_settings(database_url=svc.db_url, redis_url=svc.redis_url, _env_file=None)
    for kind in ("product", "batches"):
        app = "workers" if kind == "product" else BATCHES_APP
        celery = make_celery(settings)
        publisher = DirectPublisher(svc.redis, celery)
        signal = publisher_signal(publisher) if kind == "product" else message_signal(celery)
        with stack.celery_worker(app, 2, svc.env(), svc.log_dir, f"latency-{kind}"):
            # Warm-up, not recorded: every pool process connects and compiles its statements.
            svc.reset()
            warm = list(signed_deliveries(40, svc.secret, run=svc.run_id()))
            offered(svc, warm, 40.0, signal)
            run.wait_until_true(run.product_done(svc, len(warm)), 60)
            svc.reset()
            deliveries = list(signed_deliveries(int(rate * seconds), svc.secret, run=svc.run_id()))
            entry = offered(svc, deliveries, rate, signal)
            run.wait_until_true(run.product_done(svc, len(deliveries)), 120)
            with svc.engine.connect() as conn:
                waits = sorted(
                    1000 * (done - got).total_seconds()
                    for got, done in conn.execute(
                        select(WebhookEvent.received_at, WebhookEvent.processed_at).where(
                            WebhookEvent.processed_at.is_not(None)
                        )
                    )
                )
        publisher.close()
        celery.close()
        entry.update(
            events=len(deliveries),
            applied=len(waits),
            p50_ms=round(run.percentile(waits, 50), 1),
            p99_ms=round(run.percentile(waits, 99), 1),
            max_ms=round(waits[-1], 1) if waits else float("nan"),
        )
        out[kind] = entry
        run.progress(
            cfg,
            f"recorded to applied at {rate:.0f}/s, {kind}: p50 {entry['p50_ms']} ms, "
            f"p99 {entry['p99_ms']} ms ({entry['applied']}/{entry['events']} applied)",
        )
    return out


def table(results: dict[str, Any]) -> str:
    fmt = run.fmt
    s, m = results["settings"], results["machine"]
    lines = [
        f"celery-batches against the product's drain: {s['events']} mixed events, "
        f"{s['reps']} rep(s), median [min-max]",
        f"machine: {m['nproc']} cpu, {m['cpu_model']}; load {m['loadavg_at_start']} -> "
        f"{m['loadavg_at_end']}; celery {results['versions']['celery']}, "
        f"celery-batches {results['versions']['celery-batches']}",
        f"celery-batches: flush_every {s['flush_every']}, "
        f"flush_interval {s['flush_interval_s']} s, "
        f"worker_prefetch_multiplier {s['batches_prefetch_multiplier']}",
        "",
        "Drained events/s, the no-op floor's, and the ratios of one repetition",
        f"  {'workers':>7}  {'product (drain)':>20}  {'celery-batches':>20}  {'no-op floor':>20}  "
        f"{'product/floor':>16}  {'batches/floor':>16}  {'batches/product':>16}",
    ]
    for w, row in results["throughput"].items():
        lines.append(
            f"  {w:>7}  {fmt(row['product_events_per_s']):>20}  "
            f"{fmt(row['batches_events_per_s']):>20}  {fmt(row['floor_events_per_s']):>20}  "
            f"{fmt(row['product_ratio_to_floor'], 2):>16}  "
            f"{fmt(row['batches_ratio_to_floor'], 2):>16}  "
            f"{fmt(row['batches_ratio_to_product'], 2):>16}"
            + ("" if row["all_complete"] else "  (INCOMPLETE)")
            + ("" if row["same_outcomes"] else "  (OUTCOMES DIFFER)")
        )
    lines += [
        "",
        "Per event: worker CPU (celery main + pool, ms), PostgreSQL CPU (ms), Redis commands",
    ]
    for w, row in results["throughput"].items():
        lines.append(
            f"  {w}w  worker CPU: product {fmt(row['product_worker_cpu_ms_per_event'], 2)}, "
            f"batches {fmt(row['batches_worker_cpu_ms_per_event'], 2)}, "
            f"floor {fmt(row['floor_worker_cpu_ms_per_event'], 2)}"
        )
        lines.append(
            f"      of it the main process: product "
            f"{fmt(row['product_main_cpu_ms_per_event'], 2)}, "
            f"batches {fmt(row['batches_main_cpu_ms_per_event'], 2)}, "
            f"floor {fmt(row['floor_main_cpu_ms_per_event'], 2)}"
        )
        lines.append(
            f"      PostgreSQL CPU: product {fmt(row['product_postgres_cpu_ms_per_event'], 2)}, "
            f"batches {fmt(row['batches_postgres_cpu_ms_per_event'], 2)}"
        )
        lines.append(
            f"      Redis commands: product {fmt(row['product_redis_commands_per_event'], 2)}, "
            f"batches {fmt(row['batches_redis_commands_per_event'], 2)}, "
            f"floor {fmt(row['floor_redis_commands_per_event'], 2)} (its polling included)"
        )
        lines.append(
            f"      celery-batches ran {fmt(row['batches_per_run'])} batches a run, "
            f"{fmt(row['batches_mean_size'], 1)} messages each on average"
        )
    first = next(iter(results["throughput"].values()))
    lines += ["", f"Outcomes, the same in every run: {first['same_outcomes']} {first['outcomes']}"]
    if "latency" in results:
        lat = results["latency"]
        lines += ["", "Recorded to applied, 2 worker processes (ms)"]
        for kind, entry in lat.items():
            lines.append(
                f"  {kind:<8} at {entry['offered_per_s']:.0f}/s: p50 {entry['p50_ms']}, "
                f"p99 {entry['p99_ms']}, max {entry['max_ms']} "
                f"({entry['applied']}/{entry['events']} applied)"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> tuple[run.Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="bench.batches", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000, help="events per drain")
    parser.add_argument("--workers", default="1,2", help="celery -c values, comma-separated")
    parser.add_argument("--reps", type=int, default=3, help="repetitions")
    parser.add_argument("--latency-rate", type=float, default=100.0, help="offered/s; 0: skip")
    parser.add_argument("--latency-seconds", type=float, default=10.0, help="seconds offered")
    parser.add_argument("--json", action="store_true", help="print the results JSON on stdout")
    parser.add_argument("--out", type=Path, default=RESULT, help="results file")
    parser.add_argument("--keep-logs", action="store_true", help="keep the process logs")
    args = parser.parse_args(argv)
    # bench/run.py's own Config, for its helpers (drain, services, progress).
    cfg = run.parse_args(
        ["--phases", "e2e", "--events", str(args.events), "--workers", args.workers]
        + ["--e2e-reps", str(args.reps), "--reps", str(args.reps)]
        + (["--json"] if args.json else [])
    )
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    if importlib.util.find_spec("celery_batches") is None:
        print(
            "bench.batches: celery-batches is not installed: `make bench-batches` installs the "
            "`bench` extra in a venv of its own (.venv-bench) and runs this there",
            file=sys.stderr,
        )
        return 2
    from bench import batches_worker  # what its workers run with, for the record

    started_at = datetime.now(UTC)
    results: dict[str, Any] = {
        "schema": 1,
        "started_at": started_at.isoformat(),
        "machine": run.machine_facts(),
        "settings": {
            "events": cfg.events,
            "reps": cfg.e2e_reps,
            "worker_counts": cfg.workers,
            "flush_every": batches_worker.FLUSH_EVERY,
            "flush_interval_s": batches_worker.FLUSH_INTERVAL,
            "batches_prefetch_multiplier": batches_worker.app.conf.worker_prefetch_multiplier,
            "drain_batch_size": batches_worker.settings.drain_batch_size,
            "celery_flags": ["-P", "prefork", *stack.CELERY_FLAGS],
            "latency_rate_per_s": args.latency_rate,
            "latency_seconds": args.latency_seconds,
            "order": "floor, product, batches; reversed every other repetition",
        },
    }
    run.progress(cfg, f"{cfg.events} events, workers {cfg.workers}, {cfg.e2e_reps} rep(s)")
    with tempfile.TemporaryDirectory(prefix="dodo-bench-batches-") as tmp:
        root = Path(tmp)
        try:
            with run.services(cfg, root) as svc:
                results["versions"] = {
                    **run.versions(svc.db_url),
                    "celery-batches": metadata.version("celery-batches"),
                }
                results["throughput"] = throughput(cfg, svc)
                if args.latency_rate > 0:
                    results["latency"] = latency(cfg, svc, args.latency_rate, args.latency_seconds)
        except BaseException:
            kept = Path(tempfile.mkdtemp(prefix="dodo-bench-logs-"))
            shutil.copytree(root / "logs", kept, dirs_exist_ok=True)
            print(f"bench.batches: failed; process logs kept in {kept}", file=sys.stderr)
            raise
        if args.keep_logs:
            kept = Path(tempfile.mkdtemp(prefix="dodo-bench-logs-"))
            shutil.copytree(root / "logs", kept, dirs_exist_ok=True)
            run.progress(cfg, f"process logs kept in {kept}")
    results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["finished_at"] = datetime.now(UTC).isoformat()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text_out = json.dumps(results, indent=2, default=str) + "\n"
    args.out.write_text(text_out)
    run.progress(cfg, f"results: {args.out}")
    print(text_out if args.json else table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
