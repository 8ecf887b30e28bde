"""`dodo-webhooks` as a whole: whatever the command, a reader that goes away ends it quietly."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import Engine

from cli.main import OUTPUT_CLOSED
from tests.dead_letter_support import store_event
from tests.support import ROOT, SECRET, VENV_BIN


def run_with_closed_stdout(
    argv: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`dodo-webhooks … | head -0`, without the race: the reader is gone before it starts."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [str(VENV_BIN / "dodo-webhooks"), *argv],
            stdout=write_end,
            stderr=subprocess.PIPE,
            env={
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "DODO_PAYMENTS_WEBHOOK_KEY": "",
                **(env or {}),
            },
            cwd=cwd,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)


class TestClosedOutput:
    @pytest.mark.parametrize(
        "argv",
        [
            ["send-test", "--list"],
            ["send-test", "--list", "--json"],
            ["send-test", "payment.succeeded", "--dry-run", "--secret", SECRET],
            ["send-test", "subscription.active", "--dry-run", "--json", "--secret", SECRET],
        ],
        ids=" ".join,
    )
    def test_a_command_whose_reader_left_exits_quietly(
        self, argv: list[str], tmp_path: Path
    ) -> None:
        """As `seq 1000000 | head` ends: no traceback, the status of a SIGPIPE."""
        done = run_with_closed_stdout(argv, tmp_path)
        assert done.stderr == ""
        assert done.returncode == OUTPUT_CLOSED

    @pytest.mark.parametrize(
        "argv", [["--help"], ["dev", "--help"], ["dlq", "list", "--help"]], ids=" ".join
    )
    def test_help_whose_reader_left_is_quiet(self, argv: list[str], tmp_path: Path) -> None:
        """argparse drops the failed write itself (exit 0); nothing may reach stderr."""
        done = run_with_closed_stdout(argv, tmp_path)
        assert done.stderr == ""
        assert done.returncode in (0, OUTPUT_CLOSED)

    def test_dlq_list_whose_reader_left_exits_quietly(
        self, env: dict[str, str], clean_db: Engine, tmp_path: Path
    ) -> None:
        for n in range(30):
            store_event(clean_db, f"msg_dead_{n}", "payment.succeeded")
        done = run_with_closed_stdout(["dlq", "list"], tmp_path, env)
        assert done.stderr == ""
        assert done.returncode == OUTPUT_CLOSED

    def test_an_error_still_goes_to_stderr_in_one_line(self, tmp_path: Path) -> None:
        done = run_with_closed_stdout(["send-test", "payment.succeeded", "--dry-run"], tmp_path)
        assert done.stderr.startswith("dodo-webhooks: no signing secret")
        assert done.stderr.count("\n") == 1
        assert done.returncode == 1
