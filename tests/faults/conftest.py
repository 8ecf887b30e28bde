"""Each fault scenario's figures ride on its test's report as a user property, so that they
reach the process that prints the terminal summary (tests/conftest.py) also when the suite
runs in several pytest-xdist workers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict

import pytest

from tests.faults.scenario import SESSION_FIGURES
from tests.support import FAULT_FIGURES_PROPERTY


@pytest.fixture(autouse=True)
def _report_figures(request: pytest.FixtureRequest) -> Iterator[None]:
    before = len(SESSION_FIGURES)
    yield
    for figures in SESSION_FIGURES[before:]:
        row = {k: v for k, v in asdict(figures).items() if k not in ("violations", "notes")}
        request.node.user_properties.append((FAULT_FIGURES_PROPERTY, row))
