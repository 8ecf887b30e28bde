"""A Dodo-like sender: signs each attempt, posts from a small thread pool, retries until 2xx.

Dodo retries a non-2xx delivery (or one it could not connect for) with backoff for about
27 hours; here the deadline is the test's. The sender records which webhook ids were
acknowledged with a 2xx: those are the ones the product promised never to lose.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import requests

from shared.samples import sample_event
from tests.support import signed_headers


@dataclass(frozen=True)
class Delivery:
    """One event as Dodo sends it: a delivery id and the exact body signed."""

    webhook_id: str
    body: str
    type: str
    poison: bool = False

    @property
    def event(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]


# A payment amount PostgreSQL's BIGINT cannot hold: valid JSON, valid for pydantic's `int`
# and for the SDK's model, refused by the database on every attempt (no test hook needed).
POISON_AMOUNT = 2**63 + 7


def _event(event_type: str, at: datetime, overrides: dict[str, Any]) -> str:
    return json.dumps(sample_event(event_type, timestamp=at, overrides=overrides))


def make_events(count: int, seed: int = 7) -> list[Delivery]:
    """About `count` distinct deliveries of realistic, mixed Dodo events, ~1% of them poison.

    Each entity (payment, refund, dispute, subscription, license key, credit account) gets a
    small life cycle of events with increasing occurrence timestamps; the caller shuffles.
    """
    rng = random.Random(seed)
    base = datetime(2026, 3, 1, tzinfo=UTC)
    out: list[Delivery] = []
    n = 0

    def add(event_type: str, at: datetime, overrides: dict[str, Any], poison: bool = False) -> None:
        nonlocal n
        n += 1
        out.append(
            Delivery(f"msg_f{seed}_{n:06d}", _event(event_type, at, overrides), event_type, poison)
        )

    entity = 0
    while len(out) < count:
        entity += 1
        at = base + timedelta(minutes=entity)
        kind = rng.choice(
            [
                "payment",
                "payment",
                "refund",
                "dispute",
                "subscription",
                "license",
                "credit",
                "other",
            ]
        )
        if kind == "payment":
            pid = f"pay_f{entity}"
            types = ["payment.processing", rng.choice(["payment.succeeded", "payment.failed"])]
            for i, t in enumerate(types):
                add(
                    t,
                    at + timedelta(seconds=i),
                    {"data.payment_id": pid, "data.total_amount": 1000 + entity},
                )
        elif kind == "refund":
            rid = f"ref_f{entity}"
            for i, t in enumerate(["refund.failed", "refund.succeeded"][: rng.randint(1, 2)]):
                add(
                    t,
                    at + timedelta(seconds=i),
                    {"data.refund_id": rid, "data.payment_id": f"pay_r{entity}"},
                )
        elif kind == "dispute":
            did = f"dis_f{entity}"
            for i, t in enumerate(
                [
                    "dispute.opened",
                    "dispute.challenged",
                    rng.choice(["dispute.won", "dispute.lost"]),
                ]
            ):
                add(
                    t,
                    at + timedelta(seconds=i),
                    {"data.dispute_id": did, "data.payment_id": f"pay_d{entity}"},
                )
        elif kind == "subscription":
            sid = f"sub_f{entity}"
            types = [
                "subscription.active",
                "subscription.renewed",
                rng.choice(["subscription.on_hold", "subscription.cancelled"]),
            ]
            for i, t in enumerate(types):
                add(
                    t,
                    at + timedelta(seconds=i),
                    {"data.subscription_id": sid, "data.customer.customer_id": f"cus_s{entity}"},
                )
        elif kind == "license":
            add(
                "license_key.created",
                at,
                {"data.id": f"lic_f{entity}", "data.customer_id": f"cus_l{entity}"},
            )
        elif kind == "credit":
            customer, entitlement = f"cus_c{entity}", f"cde_c{entity}"
            balance = Decimal("0.00")
            for i in range(rng.randint(2, 5)):
                credit = i == 0 or rng.random() < 0.5
                amount = Decimal(rng.randint(1, 40))
                after = balance + amount if credit else balance - amount
                t = "credit.added" if credit else "credit.deducted"
                when = at + timedelta(seconds=i)
                overrides = {
                    "data.id": f"cle_f{entity}_{i}",
                    "data.customer_id": customer,
                    "data.credit_entitlement_id": entitlement,
                    "data.transaction_type": "credit_added" if credit else "credit_deducted",
                    "data.is_credit": credit,
                    "data.amount": str(amount),
                    "data.balance_before": str(balance),
                    "data.balance_after": str(after),
                    "data.overage_before": "0",
                    "data.overage_after": "0",
                    "data.created_at": when.isoformat(),
                }
                add(t, when, overrides)
                if rng.random() < 0.15:
                    # The same ledger entry under a second delivery id: it counts once.
                    add(t, when, overrides)
                balance = after
        else:
            add(rng.choice(["payout.created", "dunning.started", "fancy.new_type"]), at, {})
        if rng.random() < 0.01 or (entity == 5 and not any(d.poison for d in out)):
            add(
                "payment.succeeded",
                at,
                {"data.payment_id": f"pay_poison{entity}", "data.total_amount": POISON_AMOUNT},
                poison=True,
            )
    return out


def with_duplicates(events: list[Delivery], share: float = 0.2, seed: int = 7) -> list[Delivery]:
    """The deliveries in a shuffled order, with `share` of them sent a second time."""
    rng = random.Random(seed)
    deliveries = list(events) + rng.sample(events, int(len(events) * share))
    rng.shuffle(deliveries)
    return deliveries


@dataclass
class Sender:
    """Posts deliveries at a steady rate; each is retried like Dodo until 2xx or the deadline."""

    url: str
    threads: int = 12
    deadline: float = 240.0
    acked: set[str] = field(default_factory=set)
    answers: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    gave_up: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None
    done_at: float | None = None

    def _deliver(self, delivery: Delivery, give_up_at: float) -> None:
        session = requests.Session()
        wait = 0.2
        while True:
            try:
                answer = session.post(
                    f"{self.url}/webhooks/dodo",
                    data=delivery.body,
                    headers=signed_headers(delivery.body, webhook_id=delivery.webhook_id),
                    timeout=15,
                )
                outcome = str(answer.status_code)
                ok = 200 <= answer.status_code < 300
            except requests.RequestException as exc:
                outcome, ok = type(exc).__name__, False
            with self._lock:
                self.answers[outcome] += 1
                if ok:
                    self.acked.add(delivery.webhook_id)
            if ok:
                return
            if time.monotonic() > give_up_at:
                with self._lock:
                    self.gave_up.append(delivery.webhook_id)
                return
            time.sleep(wait * random.uniform(0.5, 1.0))
            wait = min(wait * 2, 2.0)

    def start(
        self,
        deliveries: list[Delivery],
        rate: float,
        *,
        gate_at: int | None = None,
        gate: threading.Event | None = None,
    ) -> None:
        """Send in the background at about `rate` deliveries per second.

        With a gate, the deliveries from index `gate_at` on wait for it to open (the fault
        healed), so that there is load after the fault to measure the throughput with.
        """

        def run() -> None:
            give_up_at = time.monotonic() + self.deadline
            with ThreadPoolExecutor(self.threads) as pool:
                begin, offset = time.monotonic(), 0
                for i, delivery in enumerate(deliveries):
                    if gate is not None and i == gate_at:
                        gate.wait()
                        begin, offset = time.monotonic(), i
                    delay = begin + (i - offset) / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    pool.submit(self._deliver, delivery, give_up_at)
                    with self._lock:
                        self.sent += 1
            self.done_at = time.time()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def wait_sent(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.sent < count and time.monotonic() < deadline:
            time.sleep(0.05)

    def join(self, timeout: float) -> None:
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(
                f"sender still busy after {timeout}s: answers {dict(self.answers)}"
            )
