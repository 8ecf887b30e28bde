"""One event's way through one process, for comparing trees: record, claim, apply.

`python bench/claim_micro.py TREE [N]`: records N payment events with TREE's ingest
`Recorder`, each then claimed (`claim_event`) and applied (`apply_event`, committed) on a
throwaway database; prints the median milliseconds of each step over the events after the
warm-up. Run it on this checkout and on an older one (a `git worktree`), alternating, to see
what a change to where bodies are stored costs per event (docs/data-lifecycle.md, "Measured
results"). Wall time on one connection: PostgreSQL's work is in it.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

tree = sys.argv[1]
sys.path.insert(0, tree)

from ingest.recording import Recorder  # noqa: E402
from shared.db import make_engine, make_sessionmaker, transaction  # noqa: E402
from shared.models import EventStatus  # noqa: E402
from tests.handlers.events import at, make_body  # noqa: E402
from tests.support import throwaway_database  # noqa: E402
from workers.claims import apply_event, claim_event  # noqa: E402

N = int(sys.argv[2]) if len(sys.argv) > 2 else 2100
WARM_UP = 100
ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"

with throwaway_database(ADMIN_URL, "claim_micro") as url:
    engine = make_engine(url)
    factory = make_sessionmaker(engine)
    recorder = Recorder(engine)
    steps: dict[str, list[float]] = {"record_ms": [], "claim_ms": [], "apply_ms": []}
    for n in range(N):
        webhook_id = f"msg_micro_{n}"
        body = make_body("payment.processing", when=at(n), payment_id=f"pay_{n % 100}")
        started = time.perf_counter()
        recorder.record(
            webhook_id=webhook_id,
            webhook_ts=1_700_000_000 + n,
            headers={"webhook-id": webhook_id},
            body=json.dumps(body).encode(),
            event_type="payment.processing",
            event_at=at(n),
        )
        recorded = time.perf_counter()
        claim = claim_event(factory, webhook_id, 60, None)
        claimed = time.perf_counter()
        assert claim is not None and claim.body, f"{webhook_id}: claimed without its body"
        with transaction(factory) as session:
            status, _ = apply_event(session, claim)
        applied = time.perf_counter()
        assert status == EventStatus.PROCESSED, f"{webhook_id}: {status}"
        if n >= WARM_UP:
            steps["record_ms"].append(recorded - started)
            steps["claim_ms"].append(claimed - recorded)
            steps["apply_ms"].append(applied - claimed)
    recorder.close()
    engine.dispose()
    medians = {step: round(1000 * statistics.median(times), 3) for step, times in steps.items()}
    print(json.dumps({"tree": tree, "events": N - WARM_UP, **medians}))
