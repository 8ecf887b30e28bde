"""Fixtures: a PostgreSQL database and a redis-server of this test session's own.

Services are never skipped: a test that needs PostgreSQL or Redis errors when it is not there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine, text

from shared.bodies import days, ensure_ahead
from shared.db import make_engine
from shared.models import Base
from shared.settings import Settings, load_settings
from tests.support import (
    ADMIN_TOKEN,
    FAULT_FIGURES_PROPERTY,
    OLD_SECRET,
    SECRET,
    Receiver,
    free_port,
    service_env,
    throwaway_database,
    wait_until,
)

PG_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh database on the local PostgreSQL, migrated with Alembic, dropped at the end."""
    with throwaway_database(PG_ADMIN_URL, "dodo_test") as url:
        yield url


@pytest.fixture(scope="session")
def pg_engine(pg_url: str) -> Iterator[Engine]:
    engine = make_engine(pg_url)
    yield engine
    engine.dispose()


@pytest.fixture
def clean_db(pg_engine: Engine) -> Engine:
    """The session database with every table emptied, and the partitions of bodies those of
    a new install (today's and the next days'): a test that made older days leaves none."""
    names = ", ".join(t.name for t in Base.metadata.sorted_tables)
    with pg_engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {names}"))
        for day in days(conn):
            conn.execute(text(f'DROP TABLE "{day.name}"'))
    ensure_ahead(pg_engine)
    return pg_engine


def start_redis(port: int, data_dir: Path, *, appendonly: bool) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    args = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data_dir),
        "--save",
        "",
        "--maxmemory-policy",
        "noeviction",
    ]
    args += (
        ["--appendonly", "yes", "--appendfsync", "always"] if appendonly else ["--appendonly", "no"]
    )
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    wait_until(client.ping, timeout=10, what=f"redis-server on port {port}")
    client.close()
    return proc


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server of this session's own, so parallel runs never share queues."""
    port = free_port()
    proc = start_redis(port, tmp_path_factory.mktemp("redis"), appendonly=False)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def clean_redis(redis_url: str) -> str:
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    client.close()
    return redis_url


@pytest.fixture
def settings(clean_db: Engine, pg_url: str, clean_redis: str) -> Settings:
    return load_settings(
        database_url=pg_url,
        redis_url=clean_redis,
        dodo_payments_webhook_key=f"{SECRET} {OLD_SECRET}",
        admin_token=ADMIN_TOKEN,
        _env_file=None,
    )


@pytest.fixture
def env(settings: Settings) -> dict[str, str]:
    """The environment a real process (gunicorn, celery) is started with."""
    return service_env(settings.database_url, settings.redis_url)


FAULT_FIGURES: list[dict[str, object]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Collect the fault scenarios' figures (tests/faults/conftest.py) from the reports: in
    this process they arrive from every xdist worker."""
    if report.when == "teardown":
        FAULT_FIGURES.extend(v for k, v in report.user_properties if k == FAULT_FIGURES_PROPERTY)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print each fault scenario's figures (no `-s` needed)."""
    if not FAULT_FIGURES:
        return
    write = terminalreporter.write_line
    terminalreporter.section("fault injection figures")
    columns = {  # title: (field, width); the scenario's name left-aligned, figures right
        "scenario": ("scenario", -40),
        "events": ("events", 6),
        "acked": ("acked", 6),
        "lost": ("lost", 4),
        "doubled": ("doubled", 7),
        "poison dead": ("poison_dead", 11),
        "fault s": ("fault_seconds", 7),
        "drain s": ("drain_seconds", 7),
        "ev/s before": ("rate_before", 11),
        "ev/s after": ("rate_after", 10),
    }

    def line(cells: list[object]) -> str:
        widths = [width for _, width in columns.values()]
        return " ".join(
            f"{c!s:<{-w}}" if w < 0 else f"{c!s:>{w}}" for c, w in zip(cells, widths, strict=True)
        )

    write(line(list(columns)))
    for row in sorted(FAULT_FIGURES, key=lambda r: str(r["scenario"])):
        write(line([row[field] for field, _ in columns.values()]))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI a skipped test is a failure: it may hide a missing Redis or PostgreSQL."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if os.environ.get("CI") and skipped and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if reporter:
            reporter.write_line(f"CI: {skipped} test(s) skipped; failing the run", red=True)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    own = Receiver(tmp_path)
    own.start()
    yield own
    own.stop()
