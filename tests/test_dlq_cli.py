"""`dodo-webhooks dlq list|show|retry`, run as a user runs it, against real PostgreSQL/Redis."""

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
from shared.models import EventStatus
from tests.dead_letter_support import event_row, hours_ago, queued, queued_tasks, store_event
from tests.support import ROOT, VENV_BIN, free_port


@pytest.fixture
def dlq(env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    # No stray .env file is read, and the in-process runs see the test services.
    monkeypatch.chdir(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Cli(env, tmp_path)


class Cli:
    """`dodo-webhooks dlq ...`: in this process by default (it is seconds faster on a busy
    machine), or as a subprocess where the process boundary is what is tested."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env = env
        self.cwd = cwd

    def __call__(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        out, err = io.StringIO(), io.StringIO()
        with (
            pytest.MonkeyPatch.context() as patch,
            redirect_stdout(out),
            redirect_stderr(err),
        ):
            for name, value in env.items():
                patch.setenv(name, value)
            code = main(["dlq", *args])
        return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())

    def subprocess(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(VENV_BIN / "dodo-webhooks"), "dlq", *args],
            env={**os.environ, "PYTHONPATH": str(ROOT), **self.env, **env},
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


class TestList:
    def test_prints_a_table_newest_first_and_a_count(self, dlq: Cli, clean_db: Engine) -> None:
        store_event(
            clean_db,
            "msg_old",
            "payment.failed",
            received_at=hours_ago(2),
            last_error="OperationalError: " + "x" * 200,
        )
        store_event(clean_db, "msg_new", None, attempts=0, received_at=hours_ago(1))
        store_event(clean_db, "msg_fine", "payment.succeeded", status=EventStatus.PROCESSED)
        result = dlq.subprocess("list")
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0].split() == ["WEBHOOK_ID", "TYPE", "ATTEMPTS", "RECEIVED_AT", "LAST_ERROR"]
        assert lines[1].split()[:3] == ["msg_new", "-", "0"]
        assert lines[2].split()[:3] == ["msg_old", "payment.failed", "3"]
        assert lines[2].endswith("…")
        assert len(lines[2]) < 160
        assert lines[3] == "2 dead letter(s)"
        assert len(lines) == 4

    def test_filters_and_limit_say_how_many_more_match(self, dlq: Cli, clean_db: Engine) -> None:
        store_event(clean_db, "msg_1", "subscription.on_hold", received_at=hours_ago(3))
        store_event(clean_db, "msg_2", "subscription.renewed", received_at=hours_ago(2))
        store_event(clean_db, "msg_3", "payment.failed", received_at=hours_ago(1))
        result = dlq("list", "--type", "subscription.*", "--limit", "1")
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[1].startswith("msg_2 ")
        assert result.stdout.splitlines()[-1] == "1 of 2 dead letter(s) (raise --limit to see more)"
        assert dlq("list", "--since", "90m").stdout.splitlines()[-1] == "1 dead letter(s)"

    def test_json_output_is_for_programs(self, dlq: Cli, clean_db: Engine) -> None:
        store_event(clean_db, "msg_1", "payment.failed")
        result = dlq("list", "--json")
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        assert answer["total"] == 1
        [letter] = answer["dead_letters"]
        assert letter["webhook_id"] == "msg_1"
        assert (letter["type"], letter["attempts"], letter["status"]) == (
            "payment.failed",
            3,
            "dead",
        )

    def test_empty_list_says_so(self, dlq: Cli, clean_db: Engine) -> None:
        result = dlq("list")
        assert (result.returncode, result.stdout) == (0, "0 dead letter(s)\n")

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["--since", "last week"], "dodo-webhooks: since: "),
            (["--limit", "lots"], "dodo-webhooks: limit: "),
        ],
    )
    def test_bad_filter_is_one_line_and_exit_1(
        self, dlq: Cli, clean_db: Engine, args: list[str], message: str
    ) -> None:
        assert one_line_error(dlq("list", *args)).startswith(message)

    def test_database_without_the_schema_is_one_line_naming_database_url(self, dlq: Cli) -> None:
        url = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        line = one_line_error(dlq("list", DATABASE_URL=url))
        assert line.startswith("dodo-webhooks: DATABASE_URL ")
        assert line.endswith("run `dodo-webhooks db upgrade`)")

    def test_unreachable_database_is_one_line_naming_database_url(self, dlq: Cli) -> None:
        url = f"postgresql+psycopg://postgres:hunter2@127.0.0.1:{free_port()}/nowhere"
        runs = [
            dlq.subprocess("list", DATABASE_URL=url),
            dlq("show", "msg_1", DATABASE_URL=url),
            dlq("retry", "--all", DATABASE_URL=url),
        ]
        for result in runs:
            line = one_line_error(result)
            assert line.startswith("dodo-webhooks: DATABASE_URL: cannot reach the database at ")
            assert "hunter2" not in line


class TestShow:
    def test_prints_the_event_with_headers_and_pretty_body(
        self, dlq: Cli, clean_db: Engine
    ) -> None:
        store_event(clean_db, "msg_1", "payment.failed", data={"payment_id": "pay_1"})
        result = dlq("show", "msg_1")
        assert result.returncode == 0, result.stderr
        assert "webhook_id:   msg_1" in result.stdout
        assert "last_error:   RuntimeError: boom" in result.stdout
        assert "  webhook-id: msg_1" in result.stdout
        assert '      "payment_id": "pay_1"' in result.stdout
        detail = json.loads(dlq("show", "msg_1", "--json").stdout)
        assert detail[0]["headers"]["webhook-id"] == "msg_1"
        assert json.loads(detail[0]["body"])["data"] == {"payment_id": "pay_1"}

    def test_unknown_id_is_an_error(self, dlq: Cli, clean_db: Engine) -> None:
        assert one_line_error(dlq("show", "msg_none")) == (
            "dodo-webhooks: no event with webhook id msg_none"
        )


class TestRetry:
    def test_dry_run_counts_and_changes_nothing(
        self, dlq: Cli, clean_db: Engine, redis_url: str
    ) -> None:
        store_event(clean_db, "msg_1", "subscription.on_hold")
        store_event(clean_db, "msg_2", "subscription.renewed")
        result = dlq("retry", "--type", "subscription.*", "--dry-run")
        assert result.returncode == 0, result.stderr
        assert result.stdout == "dry run: 2 dead letter(s) would be retried; nothing changed\n"
        assert event_row(clean_db, "msg_1").status == "dead"
        assert event_row(clean_db, "msg_1").attempts == 3
        assert queued(redis_url, "subscriptions") == 0

    def test_retries_the_named_ids_and_queues_them(
        self, dlq: Cli, clean_db: Engine, redis_url: str
    ) -> None:
        store_event(clean_db, "msg_1", "payment.failed")
        store_event(clean_db, "msg_2", "payment.failed")
        store_event(clean_db, "msg_3", "payment.failed")
        result = dlq("retry", "msg_1", "msg_3", "msg_none", "--json")
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        assert (answer["matched"], answer["requeued"], answer["queued"]) == (2, 2, 2)
        assert sorted(answer["ids"]) == ["msg_1", "msg_3"]
        assert [event_row(clean_db, i).status for i in ("msg_1", "msg_2", "msg_3")] == [
            "pending",
            "dead",
            "pending",
        ]
        # Both wake the payments queue's drain: one message, which applies them in a batch.
        assert queued_tasks(redis_url, "payments") == ["workers.drain"]

    def test_without_ids_or_filters_requires_all(
        self, dlq: Cli, clean_db: Engine, redis_url: str
    ) -> None:
        store_event(clean_db, "msg_1", "payment.failed")
        assert "--all" in one_line_error(dlq("retry"))
        assert event_row(clean_db, "msg_1").status == "dead"
        result = dlq("retry", "--all")
        assert result.stdout == "1 dead letter(s) matched, 1 set pending, 1 queued\n"

    def test_unreachable_redis_leaves_them_pending_for_the_redrive_and_says_so(
        self, dlq: Cli, clean_db: Engine
    ) -> None:
        store_event(clean_db, "msg_1", "payment.failed")
        store_event(clean_db, "msg_2", None)
        result = dlq.subprocess("retry", "--all", REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0] == "2 dead letter(s) matched, 2 set pending, 0 queued"
        assert lines[1] == (
            "note: 1 of them have no valid event envelope (type null): "
            "they will go dead again with the same reason"
        )
        assert lines[2].startswith("note: 2 event(s) are pending but could not be queued (")
        assert "re-drive" in lines[2]
        assert event_row(clean_db, "msg_1").status == "pending"
