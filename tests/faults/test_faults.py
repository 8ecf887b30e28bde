"""Fault injection against real processes: the guarantees of DESIGN.md hold whatever is killed.

One stack (Redis, PostgreSQL, gunicorn, two celery workers, beat) serves every scenario; the
database is emptied between them and each scenario uses delivery ids of its own.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.harness import LEASE_SECONDS, VISIBILITY_TIMEOUT, Stack
from tests.faults.scenario import Figures, run_scenario
from tests.faults.sender import Sender

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    running = Stack()
    try:
        running.start()
        yield running
    finally:
        running.close()


def assert_guarantees(figures: Figures, stack: Stack) -> None:
    assert not figures.violations, "\n".join(figures.violations) + f"\nlogs: {stack.logs}"
    assert figures.lost == 0 and figures.doubled == 0 and figures.not_final == 0
    assert figures.acked == figures.events
    # Throughput recovers: events keep finishing after the fault is healed.
    assert figures.rate_after > 0


def _sleep_while(seconds: float) -> None:
    time.sleep(seconds)


class TestWorkerFaults:
    def test_worker_main_process_sigkill_loses_and_doubles_nothing(self, stack: Stack) -> None:
        def fault(stack: Stack, sender: Sender, figures: Figures) -> None:
            orphans = stack.kill_worker_main("w1")
            figures.notes["pool_children_orphaned"] = len(orphans)
            stack.reap(orphans)
            stack.start_worker("w1")

        assert_guarantees(run_scenario(stack, "1-worker-main-sigkill", fault, seed=101), stack)

    def test_pool_child_sigkill_loses_and_doubles_nothing(self, stack: Stack) -> None:
        def fault(stack: Stack, sender: Sender, figures: Figures) -> None:
            killed = stack.kill_pool_children("w1")
            time.sleep(1.0)
            killed += stack.kill_pool_children("w2")
            time.sleep(1.0)
            killed += stack.kill_pool_children("w1")
            figures.notes["pool_children_killed"] = len(killed)

        assert_guarantees(run_scenario(stack, "2-pool-child-sigkill", fault, seed=102), stack)

    def test_worker_stopped_longer_than_the_lease_then_resumed_applies_once(
        self, stack: Stack
    ) -> None:
        def fault(stack: Stack, sender: Sender, figures: Figures) -> None:
            stack.stop_worker("w1")
            try:
                time.sleep(LEASE_SECONDS + 4)
            finally:
                stack.cont_worker("w1")

        assert_guarantees(run_scenario(stack, "3-worker-sigstop", fault, seed=103), stack)


class TestRedisFaults:
    def test_redis_killed_and_restarted_with_its_data(self, stack: Stack) -> None:
        def fault(stack: Stack, sender: Sender, figures: Figures) -> None:
            stack.redis.kill()
            time.sleep(3)
            stack.redis.start()

        assert_guarantees(run_scenario(stack, "4-redis-restart-with-data", fault, seed=104), stack)

    def test_redis_killed_and_restarted_empty_loses_nothing(self, stack: Stack) -> None:
        def fault(stack: Stack, sender: Sender, figures: Figures) -> None:
            client = stack.redis.client()
            figures.notes["redis_keys_wiped"] = client.dbsize()
            client.close()
            stack.redis.kill()
            stack.redis.wipe()
            time.sleep(3)
            stack.redis.start()

        assert_guarantees(run_scenario(stack, "5-redis-restart-empty", fault, seed=105), stack)


class TestPostgresFaults:
    def test_postgres_stopped_immediately_and_restarted(self, stack: Stack) -> None:
        def fault(stack: Stack, sender: Sender, figures: Figures) -> None:
            stack.pg.stop("immediate")
            time.sleep(4)
            stack.pg.start()

        figures = run_scenario(stack, "6-postgres-immediate-stop", fault, seed=106)
        assert_guarantees(figures, stack)
        # While the database was down the ingest answered 503, and Dodo-like retries won.
        assert figures.answers.get("503", 0) > 0

    def test_connections_terminated_repeatedly(self, stack: Stack) -> None:
        def fault(stack: Stack, sender: Sender, figures: Figures) -> None:
            with stack.terminating_connections(every=0.3) as killed:
                time.sleep(6)
            figures.notes["backends_terminated"] = sum(killed)

        figures = run_scenario(stack, "7-connections-terminated", fault, seed=107)
        assert_guarantees(figures, stack)
        assert figures.notes["backends_terminated"] > 0


class TestIngestFaults:
    def test_ingest_killed_between_recording_and_queueing(self, stack: Stack) -> None:
        """Redis is frozen, so each ingest worker records then blocks in the enqueue; the
        ingest is SIGKILLed there. Those events are recorded, never queued, and their sender
        got no answer: its retry is a duplicate (200) that queues nothing. Only the re-drive
        can process them."""

        def fault(stack: Stack, sender: Sender, figures: Figures) -> None:
            old = stack.ingest
            assert old is not None
            stack.redis.pause()
            try:
                time.sleep(2.5)
                stack.kill_ingest()
            finally:
                stack.redis.resume()
            figures.notes["recorded_never_queued"] = recorded_never_queued(old.log_path)
            stack.start_ingest()

        figures = run_scenario(stack, "8-ingest-killed-before-enqueue", fault, seed=108)
        assert_guarantees(figures, stack)
        assert figures.notes["recorded_never_queued"] > 0


def recorded_never_queued(log: Path) -> int:
    """Deliveries the killed ingest logged as received (recorded) but never as queued."""
    received, queued = set(), set()
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("step") == "received":
                received.add(entry.get("webhook_id"))
            elif entry.get("step") in ("queued", "queue_failed"):
                queued.add(entry.get("webhook_id"))
    return len(received - queued)


_ = VISIBILITY_TIMEOUT
