"""What in a purge batch delays the ingest: the purge set against load of one kind each.

    python -m bench.purge_compare [--rows 400000] [--reps 5] [--window 15]
        [--variants none,purge:500:0.25,cpu,wal,purge:100:0.05]

On one seeded table (bench/purge.py's `seed`) and one ingest under a fixed open-loop rate,
windows of `--window` seconds alternate between a stopped window and a window of one
variant, the variants in a new random order each repetition:

- `none`: nothing runs (the noise: the same pairing where nothing differs);
- `purge:B:P`: `shared.lifecycle.purge` with batches of B rows and a pause of P seconds;
- `cpu`: a PostgreSQL backend that computes for as long as a default purge batch takes,
  writes nothing, and pauses as long as the default purge does;
- `wal`: a backend that writes as much WAL as a default purge batch writes, at once
  (`pg_logical_emit_message`, not flushed by itself: the next commit flushes it), at the
  default purge's pace.

Each variant window's p50, p90 and p99 minus the mean of the stopped windows beside it, per
variant, median [min-max], with how many were above their neighbours and a two-sided sign
test of that count (bench/purge.py's `above_neighbours`). `cpu` and `wal` tell which of the batch's
two costs the ingest feels. Writes bench/results/purge-compare.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from bench import stack
from bench.purge import (
    DEFAULTS,
    RETENTION_DAYS,
    Job,
    above_neighbours,
    checkpoint,
    ingest,
    progress,
    rig,
    seed,
    spread,
    window_beside,
)
from shared.db import make_sessionmaker, transaction
from shared.lifecycle import purge, purge_batch, purge_cutoff

RESULTS = stack.ROOT / "bench" / "results" / "purge-compare.json"
DEFAULT_BATCH, DEFAULT_PAUSE = (
    DEFAULTS["purge_batch_size"].default,
    DEFAULTS["purge_pause_seconds"].default,
)
QUANTILES = ("p50", "p90", "p99")


def wal_lsn(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")).scalar_one())


def calibrate(engine: Engine, batches: int = 20) -> dict[str, float]:
    """A default purge batch's time and WAL, median of `batches` (these rows are purged)."""
    factory = make_sessionmaker(engine)
    cutoff = purge_cutoff(RETENTION_DAYS)
    assert cutoff is not None
    took, wal = [], []
    after = None
    for _ in range(batches):
        lsn, started = wal_lsn(engine), time.monotonic()
        with transaction(factory) as session:
            after = purge_batch(session, cutoff, DEFAULT_BATCH, after).reached
        took.append(time.monotonic() - started)
        wal.append(wal_lsn(engine) - lsn)
        time.sleep(0.25)
    # The CPU burner: generate_series rows per second of one backend.
    with engine.connect() as conn:
        started = time.monotonic()
        conn.execute(text("SELECT count(*) FROM generate_series(1, 2000000)")).scalar_one()
        per_second = 2_000_000 / (time.monotonic() - started)
    return {
        "batch_size": DEFAULT_BATCH,
        "pause_seconds": DEFAULT_PAUSE,
        "batch_seconds": statistics.median(took),
        "batch_wal_bytes": statistics.median(wal),
        "series_rows_per_second": per_second,
    }


def pacer(engine: Engine, statement: str, params: dict[str, Any], seconds: float) -> Job:
    """Run `statement` in a loop for `seconds`, pausing the default purge's pause between."""

    def run() -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        n = 0
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            while time.monotonic() < deadline:
                conn.execute(text(statement), params)
                n += 1
                time.sleep(DEFAULT_PAUSE)
        return {"runs": n}

    return run


def variant_job(name: str, engine: Engine, cal: dict[str, float], seconds: float) -> Job | None:
    if name == "none":
        return None
    if name == "cpu":
        rows = int(cal["series_rows_per_second"] * cal["batch_seconds"])
        return pacer(engine, "SELECT count(*) FROM generate_series(1, :n)", {"n": rows}, seconds)
    if name == "wal":
        size = int(cal["batch_wal_bytes"])
        return pacer(
            engine,
            "SELECT pg_logical_emit_message(false, 'bench', repeat('x', :n))",
            {"n": size},
            seconds,
        )
    kind, batch, pause = name.split(":")
    assert kind == "purge", name

    def run() -> dict[str, Any]:
        result = purge(
            make_sessionmaker(engine),
            retention_days=RETENTION_DAYS,
            batch_size=int(batch),
            pause_seconds=float(pause),
            run_seconds=seconds,
        )
        return {"purged_events": result.events, "batches": result.batches}

    return run


def measured_window(
    engine: Engine,
    port: int,
    secret: str,
    args: argparse.Namespace,
    work: Path,
    name: str,
    job: Job | None,
) -> dict[str, Any]:
    """A window with `job` beside it, and the WAL the database wrote meanwhile."""
    lsn = wal_lsn(engine)
    measured = window_beside(engine, port, secret, args, work, name, job)
    measured["wal_bytes"] = wal_lsn(engine) - lsn
    return measured


def verdicts(windows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i in range(1, len(windows) - 1):
        here = windows[i]
        if here["kind"] == "stopped":
            continue
        left, right = windows[i - 1], windows[i + 1]
        row = out.setdefault(here["kind"], {q: [] for q in QUANTILES})
        for q in QUANTILES:
            row[q].append(
                here["latency_ms"][q] - (left["latency_ms"][q] + right["latency_ms"][q]) / 2
            )

    def judged(diffs: list[float]) -> dict[str, Any]:
        above, sign_p = above_neighbours(diffs)
        return {**spread(diffs), "above": above, "n": len(diffs), "sign_test_p": round(sign_p, 4)}

    return {kind: {q: judged(v) for q, v in row.items()} for kind, row in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--rate", type=int, default=100)
    parser.add_argument("--window", type=float, default=15.0)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--variants", default="none,purge:500:1.0,purge:500:0.25,cpu,wal,purge:100:0.25"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    rng = random.Random(args.seed)
    windows: list[dict[str, Any]] = []
    with rig("bench-purge-compare-") as bench:
        work, engine, secret = bench.work, bench.engine, bench.secret
        began = time.monotonic()
        seed(engine, args.rows)
        cal = calibrate(engine)
        progress(f"seeded {args.rows}; calibration {cal}", began)
        checkpoint(engine)
        with ingest(bench) as port:

            def add(kind: str, job: Job | None) -> None:
                name = f"w{len(windows)}"
                measured = measured_window(engine, port, secret, args, work, name, job)
                windows.append({"kind": kind, **measured})
                lat = measured["latency_ms"]
                progress(
                    f"window {len(windows)} {kind}: p50 {lat['p50']:.1f} p90 {lat['p90']:.1f} "
                    f"p99 {lat['p99']:.1f} ms, WAL {measured['wal_bytes'] / 1e6:.0f} MB",
                    began,
                )

            add("stopped", None)
            for _ in range(args.reps):
                for name in rng.sample(variants, len(variants)):
                    add(name, variant_job(name, engine, cal, args.window))
                    add("stopped", None)
    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": args.rows,
        "rate": args.rate,
        "window_s": args.window,
        "reps": args.reps,
        "calibration": cal,
        "minus_neighbours_ms": verdicts(windows),
        "windows": windows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    return 0


def table(report: dict[str, Any]) -> str:
    cal = report["calibration"]
    lines = [
        f"default batch ({cal['batch_size']} rows, {cal['pause_seconds']} s pause): "
        f"{cal['batch_seconds'] * 1000:.0f} ms, "
        f"{cal['batch_wal_bytes'] / 1e6:.2f} MB of WAL; ingest {report['rate']}/s, "
        f"windows of {report['window_s']:.0f} s, {report['reps']} per variant",
        "window minus the stopped windows beside it, ms: median [min-max],"
        " windows above their neighbours, the sign test's p",
        f"{'VARIANT':<18} " + " ".join(f"{q.upper():<36}" for q in QUANTILES),
    ]
    for kind, row in report["minus_neighbours_ms"].items():
        cells = [
            f"{row[q]['median']:+.2f} [{row[q]['min']:+.2f} {row[q]['max']:+.2f}]"
            f" {row[q]['above']}/{row[q]['n']} p {row[q]['sign_test_p']:.2f}"
            for q in QUANTILES
        ]
        lines.append(f"{kind:<18} " + " ".join(f"{c:<36}" for c in cells))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
