"""`make profile`: where an ingest worker's and a Celery pool child's time goes, under load.

    python -m bench.profile [--seconds S] [--events N]

Starts the same stack as bench.run, samples one gunicorn worker with py-spy while wrk
saturates the ingest, then one pool child of `celery -A workers worker -c 1` while it
drains N recorded events, and attributes every sample to the outermost step of the request
or task it was in (verify, envelope parse, insert+commit, Celery publish, logging, ...).
Writes the raw collapsed stacks and the summary to bench/results/profile-<stamp>.*.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from bench import stack
from bench.deliveries import signed_deliveries, write_requests
from bench.run import LUA, RESULTS, Config, Services, product_done, record_and_queue, services

Rule = tuple[str, Callable[[str], bool]]


def within(step: str, *parts: str) -> Callable[[str], bool]:
    """A stack inside `step` that also passes through every one of `parts`."""
    return lambda s: step in s and all(p in s for p in parts)


def db_detail(step: str, title: str) -> list[Rule]:
    return [
        (f"{title}: pool checkout", within(step, "_checkout")),
        (f"{title}: COMMIT", within(step, "commit")),
        # psycopg waiting in poll() is not recognised as idle by py-spy: this is the round
        # trip's wall time as much as its CPU (bench.micro has the CPU alone).
        (f"{title}: execute (psycopg, round trip)", within(step, "psycopg/")),
        (f"{title}: SQLAlchemy execution path", within(step)),
    ]


# A sample (one collapsed stack) is charged to the first rule, in this order, that its stack
# passes; product steps come before the frameworks that call them.
INGEST_STEPS: list[Rule] = [
    ("gunicorn: idle, waiting for a connection", lambda s: "SyncWorker.wait" in s),
    ("verify signature (standardwebhooks, HMAC)", within("ingest/verify.py")),
    ("envelope parse (pydantic)", within("read_envelope_head")),
    # libpq's PQexecPrepared is native code: its samples stop at the recorder's own frame.
    ("record INSERT: prepared, libpq (round trip)", within("ingest/recording.py", "_exec_insert")),
    *db_detail("ingest/recording.py", "record INSERT"),
    ("publish: one LPUSH (shared/queue.py DirectPublisher)", within("ingest/publisher.py")),
    ("logging (JSON lines)", lambda s: "log_step" in s or "logging/__init__" in s),
    ("metrics (prometheus_client)", within("prometheus_client")),
    ("jsonify response", within("jsonify")),
    ("route: other", within("receive (ingest/webhooks.py")),
    ("Flask/werkzeug request and response", lambda s: "flask/" in s or "werkzeug/" in s),
    ("gunicorn: accept, parse, write", within("gunicorn/")),
]
WORKER_STEPS: list[Rule] = [
    ("pool child: idle, waiting for a task", within("billiard/", "workloop", "recv")),
    *db_detail("claim_event", "claim UPDATE"),
    ("apply: handler", within("apply_event", "workers/handlers/")),
    *db_detail("apply_event", "apply: fenced finish UPDATE"),
    ("apply: transaction COMMIT", within("shared/db.py", "commit")),
    ("settle_failure", within("settle_failure")),
    ("logging (JSON lines)", lambda s: "log_step" in s or "logging/__init__" in s),
    ("task body: other", within("process_event (workers/tasks.py")),
    ("pool child: result back to the main process", within("billiard/", "workloop", "put")),
    ("Celery trace, task events (celery, kombu)", within("celery/")),
    ("billiard pool", within("billiard/")),
]


def attribute(raw: str, steps: list[Rule]) -> dict[str, float]:
    """Share of samples per step, from py-spy's raw (collapsed) output."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack_text, _, n = line.rpartition(" ")
        if not stack_text or not n.isdigit():
            continue
        label = next((name for name, test in steps if test(stack_text)), "other (interpreter, GC)")
        counts[label] += int(n)
    total = sum(counts.values()) or 1
    return {k: round(100 * v / total, 1) for k, v in counts.most_common()} | {"samples": total}


def py_spy(pid: int, seconds: int, out: Path, *, wall: bool) -> subprocess.Popen[bytes]:
    binary = shutil.which("py-spy") or str(stack.VENV_BIN / "py-spy")
    argv = [binary, "record", "-p", str(pid), "-d", str(seconds), "-r", "200"]
    argv += ["-f", "raw", "-o", str(out), "--nonblocking"]
    if wall:
        # A sync worker's wall time is what bounds its rate, waits on PostgreSQL included.
        argv.append("--idle")
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def profile_ingest(
    cfg: Config, svc: Services, seconds: int, out: Path, *, wall: bool
) -> dict[str, float]:
    with stack.gunicorn("ingest:create_app()", svc.env(), svc.log_dir, "ingest") as proc:
        port = proc.port  # type: ignore[attr-defined]
        prefix = svc.work_dir / "profile"
        write_requests(
            prefix, 5000 * (seconds + 4), svc.secret, host=f"127.0.0.1:{port}", run="p", parts=2
        )
        argv = ["wrk", "-t", "2", "-c", "16", "-d", f"{seconds + 4}s", "-s", str(LUA)]
        wrk = subprocess.Popen(
            [*argv, f"http://127.0.0.1:{port}", "--", str(prefix)],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(2)
        spy = py_spy(stack.children(proc.pid)[0], seconds, out, wall=wall)
        spy.wait(timeout=seconds + 60)
        wrk_out, _ = wrk.communicate(timeout=seconds + 60)
    line = next((x for x in wrk_out.splitlines() if x.startswith("WRK_JSON ")), "{}")
    result = attribute(out.read_text(), INGEST_STEPS)
    wrk_json = json.loads(line.removeprefix("WRK_JSON "))
    result["acked_per_s_while_profiled"] = round(
        wrk_json.get("acked", 0) / max(wrk_json.get("duration_us", 1) / 1e6, 1e-9), 1
    )
    return result


def profile_worker(
    cfg: Config, svc: Services, seconds: int, events: int, out: Path, *, wall: bool
) -> dict[str, float]:
    svc.reset()
    record_and_queue(svc, list(signed_deliveries(events, svc.secret, run="w")))
    with stack.celery_worker("workers", 1, svc.env(), svc.log_dir, "profiled") as proc:
        time.sleep(1)
        child = stack.children(proc.pid)[0]
        spy = py_spy(child, seconds, out, wall=wall)
        done = product_done(svc, events)
        finished = threading.Event()

        def watch() -> None:
            while not finished.is_set() and not done():
                time.sleep(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        spy.wait(timeout=seconds + 60)
        finished.set()
    return attribute(out.read_text(), WORKER_STEPS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--wall",
        action="store_true",
        help="sample waiting threads too (wall clock); default: running samples only (CPU)",
    )
    args = parser.parse_args(argv)
    cfg = Config(
        mode="profile",
        reps=1,
        duration=args.seconds,
        connections=[16],
        threads=2,
        rates=[],
        rate_duration=0,
        events=args.events,
        workers=[1],
        e2e_reps=1,
        out=args.out,
        as_json=False,
    )
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    args.out.mkdir(parents=True, exist_ok=True)
    ingest_raw = args.out / f"profile-{stamp}-ingest.txt"
    worker_raw = args.out / f"profile-{stamp}-worker.txt"
    with tempfile.TemporaryDirectory(prefix="dodo-profile-") as tmp:
        root = Path(tmp)
        with services(cfg, root) as svc:
            print(
                f"profiling an ingest worker for {args.seconds}s under wrk -c 16", file=sys.stderr
            )
            ingest = profile_ingest(cfg, svc, args.seconds, ingest_raw, wall=args.wall)
            print(f"profiling a celery pool child for {args.seconds}s", file=sys.stderr)
            worker = profile_worker(cfg, svc, args.seconds, args.events, worker_raw, wall=args.wall)
    summary = {
        "clock": "wall" if args.wall else "cpu",
        "ingest_worker_percent": ingest,
        "celery_pool_child_percent": worker,
    }
    (args.out / f"profile-{stamp}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"share of {summary['clock']} samples")
    for title, shares in summary.items():
        if not isinstance(shares, dict):
            continue
        print(title)
        for label, share in shares.items():
            print(f"  {share:>8}  {label}")
    print(f"raw stacks: {ingest_raw} {worker_raw}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
