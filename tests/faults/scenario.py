"""One fault scenario: load, a fault mid-load, healing, draining, then every guarantee checked."""

from __future__ import annotations

import contextlib
import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import Connection, inspect, text

from cli.samples import sample_event
from tests.faults.harness import MAX_ATTEMPTS, Stack, process_of_backend
from tests.faults.sender import Deliverable, Poison, Sender, make_poison
from tests.lifecycles import generate, with_duplicates
from tests.reference import LEDGER_TYPES, Sent, expected_state
from tests.support import ADMIN_TOKEN, wait_until
from tests.test_model_based import api_differences

FAULT_EVENTS = int(os.environ.get("FAULT_EVENTS", "200"))
FAULT_RATE = float(os.environ.get("FAULT_RATE", "15"))
RESULTS = Path(__file__).parent / "results"
FINAL = ("processed", "ignored", "dead")
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@dataclass
class Figures:
    scenario: str
    events: int = 0  # distinct delivery ids
    deliveries: int = 0  # with the re-sent duplicates
    posts: int = 0  # HTTP attempts, with the sender's retries
    acked: int = 0
    lost: int = 0
    doubled: int = 0
    poison_dead: int = 0
    not_final: int = 0
    fault_seconds: float = 0.0
    drain_seconds: float = 0.0  # from healed and all sent, to nothing pending
    rate_before: float = 0.0  # events finished per second before the fault
    rate_after: float = 0.0  # ... and from healing to drained
    answers: dict[str, int] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)


class InFlight:
    """One event held mid-task: its handler waits on a payments row lock the test holds.

    The payment is created by a first event; the test then locks its row (`SELECT ... FOR
    UPDATE` in a transaction of its own) and sends a newer event for it. The worker claims
    that event (attempt counted, lease started) and blocks inside the handler, in its
    transaction, holding the event's row: a real task in flight, for as long as the test
    likes, with no hook in the product. `release()` lets it go on.
    """

    def __init__(self, stack: Stack, sender: Sender, seed: int, now: int) -> None:
        self.stack, self.sender = stack, sender
        payment_id = f"pay_inflight_{seed}"
        at = datetime(2026, 6, 1, tzinfo=UTC)
        self.first, self.second = (
            Sent(
                f"msg_inflight_{seed}_{n}",
                now,
                sample_event(
                    event_type,
                    timestamp=at + timedelta(hours=n),
                    overrides={"data.payment_id": payment_id},
                ),
            )
            for n, event_type in ((1, "payment.processing"), (2, "payment.succeeded"))
        )
        self.payment_id = payment_id
        self.started = False
        self._conn: Connection | None = None
        self._tx: Any = None
        self.backend_pid: int | None = None
        self.worker_pid: int | None = None

    @property
    def sents(self) -> list[Sent]:
        return [self.first, self.second] if self.started else []

    def status(self, webhook_id: str) -> tuple[str, int]:
        with self.stack.engine.connect() as conn:
            row = conn.execute(
                text("SELECT status, attempts FROM webhook_events WHERE webhook_id = :w"),
                {"w": webhook_id},
            ).one()
        return str(row[0]), int(row[1])

    def start(self) -> str:
        """Hold the task; returns the name of the worker whose pool child runs it."""
        self.started = True
        assert self.sender.deliver_now(self.first)
        wait_until(
            lambda: self.status(self.first.webhook_id)[0] == "processed",
            timeout=60,
            what="the in-flight payment to exist",
        )
        self._conn = self.stack.engine.connect()
        self._tx = self._conn.begin()
        self._conn.execute(
            text("SELECT 1 FROM payments WHERE payment_id = :p FOR UPDATE"),
            {"p": self.payment_id},
        )
        mine = self._conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        assert self.sender.deliver_now(self.second)

        def blocked() -> int | None:
            with self.stack.engine.connect() as conn:
                return conn.execute(
                    text(
                        "SELECT pid FROM pg_stat_activity "
                        "WHERE :mine = ANY(pg_blocking_pids(pid)) LIMIT 1"
                    ),
                    {"mine": mine},
                ).scalar()

        self.backend_pid = wait_until(blocked, timeout=60, what="the handler to block")
        self.worker_pid = wait_until(
            lambda: process_of_backend(self.stack.engine, self.backend_pid or 0),
            timeout=10,
            what="the process holding the blocked backend",
        )
        return self.stack.worker_of(self.worker_pid or 0)

    def release(self) -> None:
        if self._tx is not None:
            with contextlib.suppress(Exception):
                self._tx.commit()
            assert self._conn is not None
            self._conn.close()
            self._tx = self._conn = None


@dataclass
class Ctx:
    stack: Stack
    sender: Sender
    figures: Figures
    held: InFlight


Fault = Callable[[Ctx], None]


def run_scenario(
    stack: Stack,
    name: str,
    fault: Fault,
    *,
    seed: int,
    events: int = FAULT_EVENTS,
    rate: float = FAULT_RATE,
    after_share: float = 0.25,
    held_share: float = 0.3,
) -> Figures:
    """Send `events` (plus duplicates) at `rate`/s; inject `fault` once `after_share` is sent.

    The last `held_share` of the deliveries is sent only once the fault is healed, so the
    throughput after it is measured under load too.
    """
    stack.reset()
    figures = Figures(name)
    # Signed timestamps must stay within the ingest's 5-minute window for the whole run.
    now = int(time.time() + min(len_estimate(events, rate) / 2, 150))
    world = generate(seed, target=events, now=now)
    poison = make_poison(max(1, events // 100), seed=seed, now=now)
    unique: list[Deliverable] = [*world.events, *poison]
    deliveries = with_duplicates(unique, 0.2, random.Random(seed))  # type: ignore[arg-type]
    figures.events, figures.deliveries = len(unique), len(deliveries)
    sender = Sender(stack.url)
    t_start = time.time()
    healed = threading.Event()
    sender.start(deliveries, rate, gate_at=int(len(deliveries) * (1 - held_share)), gate=healed)
    sender.wait_sent(int(len(deliveries) * after_share))
    t_fault = time.time()
    held = InFlight(stack, sender, seed, now)
    try:
        fault(Ctx(stack, sender, figures, held))
    finally:
        held.release()
        t_healed = time.time()
        healed.set()
    figures.fault_seconds = round(t_healed - t_fault, 1)
    sender.join(timeout=sender.deadline + 30)
    t_sent = time.time()
    drained_at = wait_drained(stack, sender.acked, timeout=240)
    figures.drain_seconds = round(drained_at - max(t_healed, t_sent), 1)
    figures.posts = sum(sender.answers.values())
    figures.answers = dict(sender.answers)
    figures.acked = len(sender.acked)
    figures.rate_before = finished_rate(stack, t_start, t_fault)
    figures.rate_after = finished_rate(stack, t_healed, drained_at)
    figures.events += len(held.sents)
    check(stack, [*world.events, *held.sents], poison, sender, figures)
    if held.started:
        figures.notes["in_flight_event"] = dict(
            zip(("status", "attempts"), held.status(held.second.webhook_id), strict=True)
        )
    save(figures)
    return figures


def wait_drained(stack: Stack, acked: set[str], timeout: float) -> float:
    """Until every acknowledged id is recorded and nothing is pending, processing or retrying."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            with stack.engine.connect() as conn:
                rows = conn.execute(
                    text("SELECT status, count(*) FROM webhook_events GROUP BY status")
                ).all()
                counts = {str(r[0]): int(r[1]) for r in rows}
                recorded = sum(counts.values())
            last = counts
            if recorded >= len(acked) and all(s in FINAL for s in counts):
                return time.time()
        except Exception as exc:  # the database may be coming back
            last = exc
        time.sleep(0.25)
    raise AssertionError(f"not drained after {timeout}s: {last}")


def finished_rate(stack: Stack, since: float, until: float) -> float:
    if until <= since:
        return 0.0
    with stack.engine.connect() as conn:
        n = conn.execute(
            text(
                "SELECT count(*) FROM webhook_events WHERE processed_at >= :a AND processed_at < :b"
            ),
            {
                "a": datetime.fromtimestamp(since).astimezone(),
                "b": datetime.fromtimestamp(until).astimezone(),
            },
        ).scalar_one()
    return round(int(n) / (until - since), 1)


def len_estimate(events: int, rate: float) -> float:
    return events * 1.2 / rate


def check(
    stack: Stack, world: list[Sent], poison: list[Poison], sender: Sender, figures: Figures
) -> None:
    """Every guarantee of DESIGN.md, as violations written into the figures."""
    bad = figures.violations
    unique: list[Deliverable] = [*world, *poison]
    poisoned = {p.webhook_id for p in poison}
    with stack.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT webhook_id, type, status, attempts, last_error, webhook_ts "
                "FROM webhook_events"
            )
        ).all()
    events = {r.webhook_id: r for r in rows}
    # Evidence the fault bit: events that needed more than one attempt.
    figures.notes["attempts"] = dict(sorted(Counter(r.attempts for r in rows).items()))
    by_id = {d.webhook_id: d for d in unique}

    # 1. Nothing acknowledged is lost.
    lost = sorted(sender.acked - set(events))
    figures.lost = len(lost)
    if lost:
        bad.append(f"{len(lost)} acknowledged deliveries not in the database: {lost[:5]}")
    strangers = sorted(set(events) - set(by_id))
    if strangers:
        bad.append(f"recorded ids nobody sent: {strangers[:5]}")
    # Dodo gives up only after ~27h; here every delivery must have been acknowledged.
    if sender.gave_up:
        bad.append(f"{len(sender.gave_up)} deliveries never acknowledged: {sender.gave_up[:5]}")

    # 3. Every stored event is final; only poison is dead, after exactly MAX_ATTEMPTS.
    not_final = [w for w, r in events.items() if r.status not in FINAL]
    figures.not_final = len(not_final)
    if not_final:
        bad.append(f"{len(not_final)} events not final: {not_final[:5]}")
    for webhook_id, row in events.items():
        delivery = by_id.get(webhook_id)
        if delivery is None:
            continue
        if webhook_id in poisoned:
            if row.status != "dead" or row.attempts != MAX_ATTEMPTS:
                bad.append(
                    f"poison {webhook_id}: {row.status} after {row.attempts} attempts "
                    f"(want dead after {MAX_ATTEMPTS}): {row.last_error}"
                )
            else:
                figures.poison_dead += 1
        elif row.status == "dead":
            bad.append(f"{webhook_id} ({row.type}) dead after {row.attempts}: {row.last_error}")
        elif row.status in ("processed", "ignored") and not 1 <= row.attempts <= MAX_ATTEMPTS:
            bad.append(f"{webhook_id} {row.status} after {row.attempts} attempts")

    # 2. Effects exactly once, and the final state is the one of the newest unique event.
    applied = [by_id[w] for w, r in events.items() if w in by_id and r.status == "processed"]
    figures.doubled = check_effects(stack, applied, bad)
    # The read API answers what the reference model computes from the unique events.
    http = requests.Session()

    def get(path: str) -> tuple[int, Any]:
        answer = http.get(f"{stack.url}{path}", headers=AUTH, timeout=30)
        return answer.status_code, answer.json()

    expected = expected_state(world)
    problems = api_differences(get, expected)
    figures.notes["entities_compared"] = sum(len(r) for r in expected.records.values()) + len(
        expected.ledgers
    )
    if problems:
        bad.append(f"{len(problems)} differences from the reference model: {problems[:10]}")


def _columns(stack: Stack, table: str) -> set[str]:
    insp = inspect(stack.engine)
    if not insp.has_table(table):
        return set()
    return {c["name"] for c in insp.get_columns(table)}


def check_effects(stack: Stack, applied: list[Deliverable], bad: list[str]) -> int:
    """Rows kept per event (dispute history, ledger entries) exist once per unique event."""
    doubled = 0
    per_event = {
        "dispute_history": [d for d in applied if d.type.startswith("dispute.")],
        "subscription_history": [d for d in applied if d.type.startswith("subscription.")],
    }
    with stack.engine.connect() as conn:
        for table, expected in per_event.items():
            if not expected or "webhook_id" not in _columns(stack, table):
                continue
            got = conn.execute(text(f"SELECT webhook_id FROM {table}")).scalars().all()
            extra = len(got) - len(set(got))
            doubled += extra
            if extra or set(got) != {d.webhook_id for d in expected}:
                bad.append(
                    f"{table}: {len(got)} rows ({len(set(got))} distinct) for "
                    f"{len(expected)} applied events"
                )
        ledger = [d for d in applied if d.type in LEDGER_TYPES]
        if ledger and "id" in _columns(stack, "credit_entries"):
            got = conn.execute(text("SELECT id FROM credit_entries")).scalars().all()
            want = {json.loads(d.body)["data"]["id"] for d in ledger}
            doubled += len(got) - len(set(got))
            if sorted(got) != sorted(want):
                bad.append(f"credit_entries: {len(got)} rows for {len(want)} distinct entries")
    return doubled


# This process's scenarios, which tests/faults/conftest.py puts on each test's report.
SESSION_FIGURES: list[Figures] = []


def save(figures: Figures) -> None:
    SESSION_FIGURES.append(figures)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{figures.scenario}.json"
    path.write_text(json.dumps(asdict(figures), indent=2, default=str) + "\n")
    line = {k: v for k, v in asdict(figures).items() if k not in ("violations", "answers")}
    print(f"\nFAULT {json.dumps(line, default=str)}")
