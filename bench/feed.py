"""What the change feed costs: end to end without it, with it, and with an outbound URL.

`python -m bench.feed [--events N] [--workers C] [--reps R] [--baseline-tree DIR]`: the same
signed mixed events recorded and queued as `bench.run` does, drained by `celery -A workers
worker -c C`, in three variants — `baseline` (a tree without the feed, e.g. `git archive
0435197 | tar -x -C DIR`; skipped when not given), `feed` (changes written, no URL) and
`feed+url` (OUTBOUND_WEBHOOK_URL to a receiver on this box that answers 204; the run ends
when every change is delivered too). Prints events/s, worker and PostgreSQL CPU per event.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from bench import stack
from bench.deliveries import signed_deliveries
from bench.run import Config, Services, product_done, record_and_queue, services
from shared.models import Change, DeliveryStatus, OutboundDelivery

OUT_SECRET = "whsec_c2VjcmV0LWZvci10aGUtbWVyY2hhbnRzLWFwcA=="


class _Sink(BaseHTTPRequestHandler):
    received = 0

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        _Sink.received += 1
        self.send_response(204)
        self.end_headers()


def all_delivered(svc: Services) -> bool:
    with svc.engine.connect() as conn:
        left = conn.execute(
            select(func.count())
            .select_from(OutboundDelivery)
            .where(OutboundDelivery.status != DeliveryStatus.DELIVERED)
        ).scalar_one()
    return int(left) == 0


def run_variant(svc: Services, variant: str, args: argparse.Namespace, url: str) -> dict[str, Any]:
    svc.reset()
    deliveries = list(signed_deliveries(args.events, svc.secret, run=svc.run_id()))
    env = svc.env()
    if variant == "baseline":
        env["PYTHONPATH"] = str(args.baseline_tree)
    if variant == "feed+url":
        env |= {"OUTBOUND_WEBHOOK_URL": url, "OUTBOUND_WEBHOOK_SECRET": OUT_SECRET}
    record_and_queue(svc, deliveries)
    done = product_done(svc, args.events)
    name = f"{variant}-{svc.serial}".replace("+", "-")
    with stack.celery_worker("workers", args.workers, env, svc.log_dir, name) as proc:
        processes = [proc.pid, *stack.children(proc.pid)]
        cpu0, pg0 = stack.cpu_seconds(processes), stack.postgres_cpu_seconds()
        started = time.monotonic()
        while not done():
            time.sleep(0.1)
        applied = time.monotonic() - started
        delivered = None
        if variant == "feed+url":
            while not all_delivered(svc):
                time.sleep(0.1)
            delivered = time.monotonic() - started
        cpu = stack.cpu_seconds(processes) - cpu0
        pg = stack.postgres_cpu_seconds() - pg0
    with svc.engine.connect() as conn:
        changes = int(conn.execute(select(func.count()).select_from(Change)).scalar_one())
    return {
        "variant": variant,
        "events": args.events,
        "changes": changes if variant != "baseline" else 0,
        "applied_events_per_s": args.events / applied,
        "delivered_seconds": delivered,
        "worker_cpu_ms_per_event": 1000 * cpu / args.events,
        "postgres_cpu_ms_per_event": 1000 * pg / args.events,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.feed", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--baseline-tree", type=Path)
    parser.add_argument("--only", choices=["feed", "feed+url"], help="run this variant only")
    parser.add_argument("--out", type=Path, default=stack.ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    sink = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{sink.server_address[1]}/hooks"
    variants = (["baseline"] if args.baseline_tree else []) + ["feed", "feed+url"]
    if args.only:
        variants = [args.only]
    cfg = Config(
        mode="feed",
        reps=args.reps,
        duration=0,
        connections=[],
        threads=0,
        rates=[],
        rate_duration=0,
        events=args.events,
        workers=[args.workers],
        e2e_reps=args.reps,
        gunicorn_workers=0,
        out=args.out,
        as_json=False,
        keep_logs=False,
    )
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dodo-feed-") as tmp, services(cfg, Path(tmp)) as svc:
        for rep in range(args.reps):
            # Alternate the order so drift on a shared machine does not favour one variant.
            for variant in variants if rep % 2 == 0 else list(reversed(variants)):
                result = run_variant(svc, variant, args, url)
                runs.append(result)
                print(json.dumps(result))
    summary: dict[str, Any] = {}
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        summary[variant] = {
            key: statistics.median(r[key] for r in mine)
            for key in (
                "applied_events_per_s",
                "worker_cpu_ms_per_event",
                "postgres_cpu_ms_per_event",
            )
        }
        if variant == "feed+url":
            summary[variant]["delivered_seconds"] = statistics.median(
                r["delivered_seconds"] for r in mine
            )
        summary[variant]["changes"] = mine[0]["changes"]
    print(json.dumps({"events": args.events, "workers": args.workers, "summary": summary}))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "feed-latest.json").write_text(
        json.dumps({"summary": summary, "runs": runs}, indent=2) + "\n"
    )
    sink.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
