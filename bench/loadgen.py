"""An open-loop load generator at a fixed offered rate, free of coordinated omission.

Plain wrk is closed-loop (a slow answer delays the next request, hiding the queueing it
causes) and wrk2, which fixes that, is not packaged by Debian. This sends request i at
t0 + i/rate whatever happened before, each on its own connection (gunicorn's sync workers
close it anyway), and measures latency from the *scheduled* send time to the last byte of
the answer, so a stall shows up in the percentiles of everything that should have been sent
during it.

    python -m bench.loadgen --requests PREFIX --port P --rate R --duration S
prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from bench.deliveries import read_requests

MAX_IN_FLIGHT = 2048
DRAIN_TIMEOUT = 30.0


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


async def exchange(port: int, request: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length:
            await reader.readexactly(length)
        return status
    finally:
        writer.close()


async def run(requests: list[bytes], port: int, rate: float, duration: float) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    total = min(len(requests), int(rate * duration))
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors = 0
    max_lag = 0.0
    in_flight: set[asyncio.Task[None]] = set()
    shed = 0

    pending: dict[int, float] = {}

    async def one(i: int, scheduled: float, request: bytes) -> None:
        nonlocal errors
        pending[i] = scheduled
        try:
            status = await exchange(port, request)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            errors += 1
            return
        finally:
            pending.pop(i, None)
        latencies.append(loop.time() - scheduled)
        statuses[str(status)] = statuses.get(str(status), 0) + 1

    start = loop.time() + 0.05
    for i in range(total):
        scheduled = start + i / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            max_lag = max(max_lag, -delay)
        if len(in_flight) >= MAX_IN_FLIGHT:
            shed += 1  # the server is so far behind that this generator would run out of sockets
            continue
        task = asyncio.create_task(one(i, scheduled, requests[i]))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    sent_until = loop.time()
    if in_flight:
        await asyncio.wait(in_flight, timeout=DRAIN_TIMEOUT)
    ended = loop.time()
    # Still unanswered: counted at what they have waited so far (a lower bound), so an
    # overloaded server cannot improve its percentiles by never answering.
    unfinished = len(pending)
    latencies += [ended - scheduled for scheduled in pending.values()]
    for task in list(in_flight):
        task.cancel()
    latencies.sort()
    ms = [x * 1000 for x in latencies]
    return {
        "offered_rate": rate,
        "scheduled": total,
        "completed": len(latencies) - unfinished,
        "unfinished": unfinished,
        "statuses": statuses,
        "errors": errors,
        "shed": shed,
        "send_window_s": round(sent_until - start, 3),
        "achieved_rate": round((len(latencies) - unfinished) / max(ended - start, 1e-9), 1),
        "generator_max_lag_ms": round(max_lag * 1000, 2),
        "latency_ms": {
            "p50": round(percentile(ms, 50), 3),
            "p90": round(percentile(ms, 90), 3),
            "p99": round(percentile(ms, 99), 3),
            "max": round(ms[-1], 3) if ms else float("nan"),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=Path, required=True, help="prefix of the NUL files")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, required=True, help="seconds")
    args = parser.parse_args(argv)
    requests = read_requests(args.requests)
    if len(requests) < int(args.rate * args.duration):
        print(
            f"loadgen: only {len(requests)} requests for {args.rate}/s x {args.duration}s",
            file=sys.stderr,
        )
        return 2
    result = asyncio.run(run(requests, args.port, args.rate, args.duration))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
