"""One event's apply in one process (handler + commit), for comparing trees.

`python bench/apply_micro.py TREE [N]`: applies N payment events (100 payments, each moving
forward) through TREE's handlers on a throwaway database; prints the median and mean per
event. Run it on this checkout and on one without the change feed to see what the feed
costs per event (README "Performance").
"""

from __future__ import annotations

import json
import statistics
import sys
import time

tree = sys.argv[1]
sys.path.insert(0, tree)

from shared.db import make_engine, make_sessionmaker, transaction  # noqa: E402
from tests.handlers.events import at, make_event  # noqa: E402
from tests.support import throwaway_database  # noqa: E402
from workers.handlers import ROUTES  # noqa: E402

N = int(sys.argv[2]) if len(sys.argv) > 2 else 1050
WARM_UP = 50

with throwaway_database("postgresql+psycopg://postgres@127.0.0.1:5432/postgres", "micro") as url:
    engine = make_engine(url)
    factory = make_sessionmaker(engine)
    events = [
        make_event("payment.processing", when=at(n), payment_id=f"pay_{n % 100}") for n in range(N)
    ]
    times = []
    for position, (event, delivery) in enumerate(events):
        started = time.perf_counter()
        with transaction(factory) as session:
            ROUTES[event.type](session, event, delivery)
        if position >= WARM_UP:
            times.append(time.perf_counter() - started)
    engine.dispose()
    print(
        json.dumps(
            {
                "tree": tree,
                "events": len(times),
                "median_ms": round(1000 * statistics.median(times), 3),
                "mean_ms": round(1000 * statistics.mean(times), 3),
            }
        )
    )
