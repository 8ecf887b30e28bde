"""Fault injection against real processes: the guarantees of DESIGN.md hold whatever is killed.

One stack (Redis, PostgreSQL, gunicorn, two celery workers, beat) serves every scenario; the
database is emptied between them and each scenario uses delivery ids of its own.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.catalog import EVENT_QUEUES
from tests.faults.harness import LEASE_SECONDS, VISIBILITY_TIMEOUT, Stack
from tests.faults.scenario import Ctx, Figures, run_scenario
from tests.support import wait_until

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
    # Throughput recovers: events keep finishing after the fault is healed, and the backlog
    # is gone soon after the last delivery.
    assert figures.rate_after > 0
    assert figures.drain_seconds < 60


class TestWorkerFaults:
    def test_worker_main_process_sigkill_loses_and_doubles_nothing(self, stack: Stack) -> None:
        def fault(ctx: Ctx) -> None:
            name = ctx.held.start()  # this worker's pool child is mid-task
            orphans = stack.kill_worker_main(name)
            time.sleep(2)
            ctx.figures.notes["orphans_still_alive_after_2s"] = sum(
                Path(f"/proc/{pid}").exists() for pid in orphans
            )
            stack.reap(orphans, timeout=0)  # the rest of the worker dies too
            ctx.held.release()
            stack.start_worker(name)

        figures = run_scenario(stack, "1-worker-main-sigkill", fault, seed=101)
        assert_guarantees(figures, stack)
        # The task killed mid-way was taken over after its lease: a second attempt.
        assert figures.notes["in_flight_event"] == {"status": "processed", "attempts": 2}

    def test_pool_child_sigkill_loses_and_doubles_nothing(self, stack: Stack) -> None:
        def fault(ctx: Ctx) -> None:
            name = ctx.held.start()
            killed = stack.kill_pool_children(name)  # the one mid-task among them
            time.sleep(1.0)
            ctx.held.release()
            killed += stack.kill_pool_children("w1" if name == "w2" else "w2")
            time.sleep(1.0)
            killed += stack.kill_pool_children(name)
            ctx.figures.notes["pool_children_killed"] = len(killed)

        figures = run_scenario(stack, "2-pool-child-sigkill", fault, seed=102)
        assert_guarantees(figures, stack)
        assert figures.notes["in_flight_event"] == {"status": "processed", "attempts": 2}

    def test_worker_stopped_longer_than_the_lease_then_resumed_applies_once(
        self, stack: Stack
    ) -> None:
        """A frozen worker (SIGSTOP: a paused VM, a stuck process) holding a task mid-way
        must not keep that event from being processed by the others once the lease is out;
        and once it resumes, it must not apply the event a second time."""

        def fault(ctx: Ctx) -> None:
            name = ctx.held.start()
            stack.stop_worker(name)
            try:
                # Its handler now gets the lock, in a transaction the frozen process holds.
                ctx.held.release()
                deadline = time.monotonic() + LEASE_SECONDS + 15
                while time.monotonic() < deadline:
                    if ctx.held.status(ctx.held.second.webhook_id)[0] == "processed":
                        break
                    time.sleep(0.25)
                ctx.figures.notes["in_flight_processed_while_frozen"] = (
                    ctx.held.status(ctx.held.second.webhook_id)[0] == "processed"
                )
            finally:
                stack.cont_worker(name)

        figures = run_scenario(stack, "3-worker-sigstop", fault, seed=103)
        assert_guarantees(figures, stack)
        assert figures.notes["in_flight_processed_while_frozen"]
        assert figures.notes["in_flight_event"] == {"status": "processed", "attempts": 2}

    def test_task_slower_than_the_visibility_timeout_is_applied_once(self, stack: Stack) -> None:
        """The handler is held (a row lock the test holds) past Redis' visibility timeout, so
        kombu hands the same drain message to a second worker while the first still runs it.

        kombu sweeps expired unacknowledged messages when a worker starts and then only every
        ~100 s (unacked_restore_interval x throttle); to see the redelivery within the test's
        patience a third worker is started once the timeout has passed — a scale-up, as
        `docker compose up --scale worker=3` does — and its start-up sweep restores it. The
        redelivered drain claims only pending events: the held one, `processing` with a live
        claim, is left to the first worker, which applies it once when the lock goes.
        """

        def fault(ctx: Ctx) -> None:
            earlier = redelivered_drains(stack)  # by the scenarios before this one
            name = ctx.held.start()
            time.sleep(VISIBILITY_TIMEOUT + 2)
            stack.start_worker("w3")
            started = time.monotonic()
            try:
                wait_until(
                    lambda: redelivered_drains(stack) - earlier,
                    timeout=150,
                    interval=0.5,
                    what="the held drain redelivered",
                )
                ctx.figures.notes["redelivered_drain_ran"] = True
            except AssertionError:
                ctx.figures.notes["redelivered_drain_ran"] = False
            ctx.figures.notes["redelivery_seconds_after_w3"] = round(time.monotonic() - started, 1)
            # Still the first worker's: the redelivered drain did not take it over.
            ctx.figures.notes["held_while_redelivered"] = ctx.held.status(
                ctx.held.second.webhook_id
            ) == ("processing", 1)
            ctx.figures.notes["held_by"] = name
            ctx.held.release()

        try:
            figures = run_scenario(stack, "9-task-slower-than-visibility-timeout", fault, seed=109)
        finally:
            if "w3" in stack.workers:
                stack.workers.pop("w3").stop()
        assert_guarantees(figures, stack)
        assert figures.notes["redelivered_drain_ran"]
        assert figures.notes["held_while_redelivered"]
        # Applied once, by its first attempt; the redelivered drain left it alone.
        assert figures.notes["in_flight_event"] == {"status": "processed", "attempts": 1}


DRAIN_RECEIVED = re.compile(r"Task workers\.drain\[([0-9a-f-]+)\] received")


def redelivered_drains(stack: Stack) -> set[str]:
    """Drain messages some worker received twice: Redis handed them out again."""
    seen: dict[str, int] = {}
    for proc in stack.workers.values():
        for task_id in DRAIN_RECEIVED.findall(proc.output()):
            seen[task_id] = seen.get(task_id, 0) + 1
    return {task_id for task_id, count in seen.items() if count > 1}


def queued_messages(stack: Stack) -> dict[str, int]:
    """Messages waiting in the event queues, and delivered but not yet acknowledged."""
    client = stack.redis.client()
    try:
        waiting = sum(int(client.llen(queue)) for queue in EVENT_QUEUES)
        return {"waiting": waiting, "unacked": int(client.hlen("unacked"))}
    finally:
        client.close()


def freeze_workers(stack: Stack, seconds: float) -> dict[str, int]:
    """SIGSTOP every worker for a moment so that messages pile up in Redis."""
    for name in stack.workers:
        stack.stop_worker(name)
    time.sleep(seconds)
    return queued_messages(stack)


def thaw_workers(stack: Stack) -> None:
    for name in stack.workers:
        stack.cont_worker(name)


class TestRedisFaults:
    """The workers are frozen for 2 s first, so that Redis holds a backlog when it dies."""

    def test_redis_killed_and_restarted_with_its_data(self, stack: Stack) -> None:
        def fault(ctx: Ctx) -> None:
            try:
                ctx.figures.notes["queued_at_kill"] = freeze_workers(stack, 2)
                stack.redis.kill()
                time.sleep(3)
                stack.redis.start()
                # appendfsync always: every message Redis had acknowledged is back.
                ctx.figures.notes["queued_after_restart"] = queued_messages(stack)
            finally:
                thaw_workers(stack)

        figures = run_scenario(stack, "4-redis-restart-with-data", fault, seed=104)
        assert_guarantees(figures, stack)
        assert figures.notes["queued_at_kill"]["waiting"] > 0
        # Nothing Redis held at the kill is missing after the restart (the ingest may have
        # queued more in between, and the frozen workers consumed nothing).
        before, after = figures.notes["queued_at_kill"], figures.notes["queued_after_restart"]
        assert after["waiting"] >= before["waiting"]
        assert after["unacked"] >= before["unacked"]

    def test_redis_killed_and_restarted_empty_loses_nothing(self, stack: Stack) -> None:
        def fault(ctx: Ctx) -> None:
            try:
                ctx.figures.notes["messages_wiped"] = freeze_workers(stack, 2)
                stack.redis.kill()
                stack.redis.wipe()
                time.sleep(3)
                stack.redis.start()
                ctx.figures.notes["queued_after_restart"] = queued_messages(stack)
            finally:
                thaw_workers(stack)

        figures = run_scenario(stack, "5-redis-restart-empty", fault, seed=105)
        assert_guarantees(figures, stack)
        # Work signals were lost for sure; the events came back through the re-drive.
        assert figures.notes["messages_wiped"]["waiting"] > 0
        assert figures.notes["queued_after_restart"] == {"waiting": 0, "unacked": 0}


class TestPostgresFaults:
    def test_postgres_stopped_immediately_and_restarted(self, stack: Stack) -> None:
        def fault(ctx: Ctx) -> None:
            stack.pg.stop("immediate")
            time.sleep(4)
            stack.pg.start()

        figures = run_scenario(stack, "6-postgres-immediate-stop", fault, seed=106)
        assert_guarantees(figures, stack)
        # While the database was down the ingest answered 503, and Dodo-like retries won.
        assert figures.answers.get("503", 0) > 0

    def test_connections_terminated_repeatedly(self, stack: Stack) -> None:
        def fault(ctx: Ctx) -> None:
            with stack.terminating_connections(every=0.3) as killed:
                time.sleep(6)
            ctx.figures.notes["backends_terminated"] = sum(killed)

        figures = run_scenario(stack, "7-connections-terminated", fault, seed=107)
        assert_guarantees(figures, stack)
        assert figures.notes["backends_terminated"] > 0


class TestIngestFaults:
    def test_ingest_killed_between_recording_and_queueing(self, stack: Stack) -> None:
        """Redis is frozen, so each ingest worker records then blocks in the enqueue; the
        ingest is SIGKILLed there. Those events are recorded, never queued, and their sender
        got no answer: its retry is a duplicate (200) that queues nothing. Only the re-drive
        can process them."""

        def fault(ctx: Ctx) -> None:
            old = stack.ingest
            assert old is not None
            stack.redis.pause()
            try:
                time.sleep(2.5)
                stack.kill_ingest()
            finally:
                stack.redis.resume()
            ctx.figures.notes["recorded_never_queued"] = recorded_never_queued(old.log_path)
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
