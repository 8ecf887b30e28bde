"""`dodo-webhooks purge` and `dodo-webhooks erase-customer` (cli/lifecycle.py)."""

from __future__ import annotations

import io
import json
import os
import subprocess
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from sqlalchemy import Engine

from cli.main import main
from tests.handlers.events import T0
from tests.lifecycle_support import ALICE, Feed, age, body_for
from tests.support import ROOT, VENV_BIN, stored_event


@pytest.fixture
def service_environment(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No stray .env file is read, and the in-process runs see the test services."""
    monkeypatch.chdir(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def old_events(engine: Engine, count: int) -> list[str]:
    feed = Feed(engine)
    ids = [
        feed.send(body_for("payment.succeeded", ALICE, T0, payment_id=f"pay_{n}"))
        for n in range(count)
    ]
    age(engine, ids, days=45)
    return ids


@pytest.mark.usefixtures("service_environment")
class TestPurgeCommand:
    def test_prints_a_table_with_the_events_and_bytes_purged(self, clean_db: Engine) -> None:
        old_events(clean_db, 3)
        dry = cli("purge", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "EVENTS WOULD PURGE" in dry.stdout and "dry run: nothing changed" in dry.stdout
        result = cli("purge")
        assert result.returncode == 0, result.stderr
        assert "RETENTION" in result.stdout and "30 days" in result.stdout
        events_line = next(x for x in result.stdout.splitlines() if x.startswith("EVENTS"))
        assert events_line.split()[-1] == "3"
        days_line = next(x for x in result.stdout.splitlines() if x.startswith("DAYS"))
        assert days_line.split()[-1] == "1"

    def test_json_gives_the_counts_and_a_second_run_purges_nothing(self, clean_db: Engine) -> None:
        old_events(clean_db, 2)
        first = json.loads(cli("purge", "--json").stdout)
        second = json.loads(cli("purge", "--json").stdout)
        assert (first["events"], first["dry_run"], first["retention_days"]) == (2, False, 30)
        assert first["bytes"] > 0
        assert (second["events"], second["bytes"]) == (0, 0)

    def test_retention_zero_says_so_and_purges_nothing(
        self, clean_db: Engine, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        ids = old_events(clean_db, 1)
        monkeypatch.setenv("RETENTION_DAYS", "0")
        result = cli("purge")
        assert result.returncode == 0
        assert "retention is off (RETENTION_DAYS=0)" in result.stdout
        assert stored_event(clean_db, ids[0]).body is not None


@pytest.mark.usefixtures("service_environment")
class TestEraseCustomerCommand:
    def test_prints_the_rows_found_and_changed_per_table(self, clean_db: Engine) -> None:
        Feed(clean_db).send(body_for("payment.succeeded", ALICE, T0, payment_id="pay_1"))
        result = cli("erase-customer", ALICE.customer_id)
        assert result.returncode == 0, result.stderr
        rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()}
        assert rows["TABLE"] == ["ROWS", "CHANGED"]
        assert rows["webhook_events"] == ["1", "1"] and rows["payments"] == ["1", "1"]
        assert f"customer {ALICE.customer_id} erased" in result.stdout
        assert ALICE.email not in result.stdout + result.stderr

    def test_json_and_dry_run(self, clean_db: Engine) -> None:
        Feed(clean_db).send(body_for("payment.succeeded", ALICE, T0, payment_id="pay_1"))
        dry = json.loads(cli("erase-customer", ALICE.customer_id, "--dry-run", "--json").stdout)
        assert (dry["dry_run"], dry["erasure_id"]) == (True, None)
        real = json.loads(cli("erase-customer", ALICE.customer_id, "--json").stdout)
        again = json.loads(cli("erase-customer", ALICE.customer_id, "--json").stdout)
        assert real["counts"] == dry["counts"]
        assert all(c["changed"] == 0 for c in again["counts"].values())
        assert again["erasure_id"] == real["erasure_id"] + 1

    def test_an_unreachable_database_is_one_line_naming_database_url(
        self, env: dict[str, str], tmp_path: Path
    ) -> None:
        result = subprocess.run(
            [str(VENV_BIN / "dodo-webhooks"), "erase-customer", ALICE.customer_id],
            env={
                **os.environ,
                "PYTHONPATH": str(ROOT),
                **env,
                "DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:1/none",
            },
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dodo-webhooks: DATABASE_URL:"), lines

    def test_a_blank_customer_id_is_one_line(self, clean_db: Engine) -> None:
        result = cli("erase-customer", "  ")
        assert result.returncode == 1
        assert result.stderr.strip() == (
            "dodo-webhooks: customer id: expected 1-255 characters, e.g. cus_123"
        )
