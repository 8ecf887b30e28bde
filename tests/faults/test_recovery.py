"""Recovery from a killed worker with the product's default settings (LEASE_SECONDS=300)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.faults.harness import Stack
from tests.faults.scenario import InFlight
from tests.faults.sender import Sender

pytestmark = pytest.mark.slow

# DESIGN/issue: events held by a killed worker are applied again within a minute of the kill.
RECOVERY_LIMIT_SECONDS = 60


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    running = Stack(tuning={})  # every setting at its default
    try:
        running.start()
        yield running
    finally:
        running.close()


def held_then_killed(stack: Stack, seed: int, kill: str) -> tuple[InFlight, float]:
    """An event mid-task (its handler blocked on a row lock the test holds), then its worker
    killed with SIGKILL; the lock is released at once. Returns the event and the kill time."""
    stack.reset()
    held = InFlight(stack, Sender(stack.url), seed, int(time.time()))
    name = held.start()
    if kill == "pool child":
        killed = stack.kill_pool_children(name)
    else:
        killed = stack.kill_worker_main(name)
    killed_at = time.monotonic()
    assert killed
    held.release()
    if kill == "main process":
        stack.reap(killed, timeout=10)
        stack.start_worker(name)  # `restart: unless-stopped` in compose
    return held, killed_at


def wait_processed(held: InFlight, killed_at: float) -> float:
    webhook_id = held.second.webhook_id
    while time.monotonic() - killed_at < RECOVERY_LIMIT_SECONDS + 30:
        if held.status(webhook_id)[0] == "processed":
            return time.monotonic() - killed_at
        time.sleep(0.25)
    raise AssertionError(f"{webhook_id} still {held.status(webhook_id)} after the kill")


class TestKilledWorkerWithDefaults:
    def test_a_killed_pool_childs_event_is_applied_again_within_a_minute(
        self, stack: Stack
    ) -> None:
        held, killed_at = held_then_killed(stack, 301, "pool child")
        took = wait_processed(held, killed_at)
        assert took < RECOVERY_LIMIT_SECONDS, f"{took:.1f} s"
        # The killed attempt counts once; the second applied it, once.
        assert held.status(held.second.webhook_id) == ("processed", 2)

    def test_a_killed_worker_main_process_event_is_applied_again_within_a_minute(
        self, stack: Stack
    ) -> None:
        """Its message stays unacknowledged in Redis for an hour: the re-drive takes it back."""
        held, killed_at = held_then_killed(stack, 302, "main process")
        took = wait_processed(held, killed_at)
        assert took < RECOVERY_LIMIT_SECONDS, f"{took:.1f} s"
        assert held.status(held.second.webhook_id) == ("processed", 2)
