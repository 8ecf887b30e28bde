"""Print each fault scenario's figures in the terminal summary (no `-s` needed)."""

from __future__ import annotations

import pytest

from tests.faults.scenario import SESSION_FIGURES


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not SESSION_FIGURES:
        return
    write = terminalreporter.write_line
    terminalreporter.section("fault injection figures")
    write(
        f"{'scenario':40} {'events':>6} {'acked':>6} {'lost':>4} {'doubled':>7} "
        f"{'poison dead':>11} {'fault s':>7} {'drain s':>7} {'ev/s before':>11} {'ev/s after':>10}"
    )
    for f in SESSION_FIGURES:
        write(
            f"{f.scenario:40} {f.events:>6} {f.acked:>6} {f.lost:>4} {f.doubled:>7} "
            f"{f.poison_dead:>11} {f.fault_seconds:>7} {f.drain_seconds:>7} "
            f"{f.rate_before:>11} {f.rate_after:>10}"
        )
