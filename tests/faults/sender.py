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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import requests

from cli.samples import sample_event
from tests.support import signed_headers


class Deliverable(Protocol):
    """What the sender needs of a delivery (`tests.reference.Sent` is one)."""

    @property
    def webhook_id(self) -> str: ...
    @property
    def webhook_ts(self) -> int: ...
    @property
    def body(self) -> str: ...
    @property
    def type(self) -> str: ...


@dataclass(frozen=True)
class Poison:
    """An event that verifies and validates, and that PostgreSQL refuses on every attempt.

    `1e400` is a valid JSON number (RFC 8259 sets no range) and the schemas accept any
    value in the free-form `metadata`; parsed, it is a float infinity, which the handler
    stores in the `data` JSON column as `Infinity` — not JSON, refused by PostgreSQL with
    "invalid input syntax for type json". The error is not a validation error, so the
    product retries it MAX_ATTEMPTS times and then dead-letters it. No test hook involved.
    """

    webhook_id: str
    webhook_ts: int
    body: str
    type: str = "payment.succeeded"


def make_poison(count: int, *, seed: int, now: int) -> list[Poison]:
    out = []
    for i in range(count):
        event = sample_event(
            "payment.succeeded",
            overrides={
                "data.payment_id": f"pay_poison_{seed}_{i}",
                "data.metadata": {"score": "SCORE"},
            },
        )
        body = json.dumps(event).replace('"SCORE"', "1e400")
        out.append(Poison(f"msg_poison_{seed}_{i}", now, body))
    return out


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

    def _deliver(self, delivery: Deliverable, give_up_at: float) -> None:
        session = requests.Session()
        wait = 0.2
        while True:
            try:
                answer = session.post(
                    f"{self.url}/webhooks/dodo",
                    data=delivery.body,
                    # Signed at the delivery's own webhook-timestamp: the reference model
                    # breaks occurrence-time ties with it.
                    headers=signed_headers(
                        delivery.body,
                        webhook_id=delivery.webhook_id,
                        at=datetime.fromtimestamp(delivery.webhook_ts, UTC),
                    ),
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

    def deliver_now(self, delivery: Deliverable, timeout: float = 60) -> bool:
        """Deliver one, retrying like Dodo, in the caller's thread; True once acknowledged."""
        self._deliver(delivery, time.monotonic() + timeout)
        return delivery.webhook_id in self.acked

    def start(
        self,
        deliveries: Sequence[Deliverable],
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
