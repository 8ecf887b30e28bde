"""`dodo-webhooks dev`: the whole pipeline from one command, stopped cleanly by Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from cli.dev import (
    DEV_ENV_FILE,
    Child,
    DevError,
    banner,
    dev_settings,
    mask,
    masker,
    read_env_file,
    readable,
)
from cli.main import OUTPUT_CLOSED
from tests.support import (
    OLD_SECRET,
    OUT_SECRET,
    ROOT,
    SECRET,
    VENV_BIN,
    ManagedProcess,
    Receiver,
    free_port,
    wait_until,
)

DEV_ENV = {
    # The user's own settings must not leak into the dev server under test.
    "DODO_PAYMENTS_WEBHOOK_KEY": "",
    "ADMIN_TOKEN": "",
    "PYTHONUNBUFFERED": "1",
}


def descendants(root: int) -> set[int]:
    """Every live process below `root`, read from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def command_of(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return f"{pid} (gone)"
    return f"{pid} " + " ".join(a.decode(errors="replace") for a in argv if a)


def banner_value(output: str, label: str) -> str:
    for line in output.splitlines():
        if line.strip().startswith(label):
            return line.strip().removeprefix(label).split()[0]
    raise AssertionError(f"{label!r} not in the dev server's output:\n{output}")


def start_dev(
    name: str,
    port: int,
    data_dir: Path,
    log_dir: Path,
    *,
    env: dict[str, str] | None = None,
    extra: list[str] | None = None,
) -> ManagedProcess:
    """`dodo-webhooks dev` as the README runs it, once its banner is printed."""
    argv = [str(VENV_BIN / "dodo-webhooks"), "dev", "--port", str(port), *(extra or [])]
    dev = ManagedProcess(
        name, [*argv, "--data-dir", str(data_dir)], {**DEV_ENV, **(env or {})}, log_dir
    )
    try:
        wait_until(
            lambda: "Ctrl-C stops everything" in dev.output(),
            timeout=90,
            what=f"the dev banner; output:\n{dev.output()}",
        )
    except BaseException:
        dev.stop(signal.SIGKILL)
        raise
    return dev


class TestDevCommand:
    def test_sent_event_is_processed_and_ctrl_c_stops_every_child(self, tmp_path: Path) -> None:
        """The README's path: dev, send-test, look at the event, Ctrl-C; nothing left behind."""
        data_dir = tmp_path / "data"
        port = free_port()
        dev = start_dev("dev", port, data_dir, tmp_path)
        try:
            output = dev.output()
            assert banner_value(output, "webhook URL") == f"http://127.0.0.1:{port}/webhooks/dodo"
            token = banner_value(output, "admin token")
            assert banner_value(output, "secret").startswith("whsec_")

            sent = subprocess.run(
                [
                    str(VENV_BIN / "dodo-webhooks"),
                    "send-test",
                    "payment.succeeded",
                    "--data-dir",
                    str(data_dir),
                    "--json",
                ],
                env={**os.environ, **DEV_ENV},
                capture_output=True,
                text=True,
                timeout=60,
                cwd=tmp_path,
            )
            assert sent.returncode == 0, sent.stderr
            answer = json.loads(sent.stdout)
            assert answer["http_status"] == 202
            webhook_id = answer["webhook_id"]

            def final_status() -> str | None:
                event = requests.get(
                    f"http://127.0.0.1:{port}/api/events/{webhook_id}",
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=5,
                ).json()
                return event["status"] if event["status"] in ("processed", "ignored") else None

            wait_until(final_status, timeout=60, what=f"event processed; output:\n{dev.output()}")
            wait_until(lambda: "dev@" in dev.output(), timeout=30, what="worker ready line")

            children = descendants(dev.pid)
            assert len(children) >= 5, children  # gunicorn + 2 workers, celery + pool, beat
            os.killpg(dev.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
            assert dev.proc.wait(timeout=45) == 0, dev.output()
            wait_until(
                lambda: not [pid for pid in children if alive(pid)],
                timeout=15,
                what="every child of the dev server to be gone",
            )
            assert "dev: stopped" in dev.output()
            assert not (tmp_path / "celerybeat-schedule").exists()
        finally:
            dev.stop(signal.SIGKILL)

    def test_forward_to_sends_each_change_signed_to_the_local_app(
        self, tmp_path: Path, receiver: Receiver
    ) -> None:
        """`dev --forward-to URL`, then `send-test`: the app gets the change, verified."""
        data_dir = tmp_path / "data"
        dev = start_dev(
            "dev-forward",
            free_port(),
            data_dir,
            tmp_path,
            extra=["--forward-to", receiver.url],
            env={"OUTBOUND_WEBHOOK_SECRET": OUT_SECRET},
        )
        try:
            assert f"changes to {receiver.url}" in dev.output()
            sent = subprocess.run(
                [
                    str(VENV_BIN / "dodo-webhooks"),
                    "send-test",
                    "subscription.active",
                    "--set",
                    "data.subscription_id=sub_forward",
                    "--data-dir",
                    str(data_dir),
                ],
                env={**os.environ, **DEV_ENV},
                capture_output=True,
                text=True,
                timeout=60,
                cwd=tmp_path,
            )
            assert sent.returncode == 0, sent.stderr
            wait_until(
                lambda: receiver.records(), timeout=60, what=f"a change; output:\n{dev.output()}"
            )
            [record] = receiver.records()
            assert record["verified"]
            assert record["body"]["type"] == "subscription.changed"
            assert record["body"]["data"]["entity_id"] == "sub_forward"
            assert record["body"]["data"]["after"]["status"] == "active"
        finally:
            dev.stop(signal.SIGINT, timeout=45)

    def test_children_stop_even_when_dev_itself_is_killed(self, tmp_path: Path) -> None:
        """SIGKILL gives `dev` no chance to clean up: the children must notice on their own."""
        port = free_port()
        children: set[int] = set()
        dev = start_dev("dev-killed", port, tmp_path, tmp_path)
        try:
            children = descendants(dev.pid)
            assert children
            os.kill(dev.pid, signal.SIGKILL)

            def left() -> list[str]:
                return [command_of(pid) for pid in children if alive(pid)]

            try:
                wait_until(lambda: not left(), timeout=30, what="the orphaned children to stop")
            except AssertionError as timed_out:
                raise AssertionError(f"{timed_out}; still running: {left()}") from None
        finally:
            dev.stop(signal.SIGKILL)
            for pid in children:  # so a failure here leaves nothing running either
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)

    def test_port_in_use_is_one_line_and_exit_status_1(self, tmp_path: Path) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            result = subprocess.run(
                [str(VENV_BIN / "dodo-webhooks"), "dev", "--port", str(port)],
                env={**os.environ, **DEV_ENV},
                capture_output=True,
                text=True,
                timeout=60,
                cwd=tmp_path,
            )
        assert result.returncode == 1
        assert result.stderr.strip().count("\n") == 0, result.stderr
        assert f"port {port}" in result.stderr and "already in use" in result.stderr
        assert "--port" in result.stderr
        assert not (tmp_path / "dev-data").exists()

    def test_secrets_from_the_environment_are_masked_in_the_banner_and_absent_from_the_data_dir(
        self, tmp_path: Path
    ) -> None:
        """The banner says what runs; a secret or token the user gave appears nowhere in full."""
        data_dir = tmp_path / "data"
        port = free_port()
        token = "admin-token-from-the-environment-42"
        given = {"DODO_PAYMENTS_WEBHOOK_KEY": f"{SECRET},{OLD_SECRET}", "ADMIN_TOKEN": token}
        dev = start_dev(
            "dev-env", port, data_dir, tmp_path, env=given, extra=["--concurrency", "3"]
        )
        try:
            output = dev.output()
            assert "Celery worker (3 processes, --concurrency 3)" in output
            assert banner_value(output, "secret") == mask(SECRET)
            assert banner_value(output, "admin token") == mask(token)
            assert 'Bearer $ADMIN_TOKEN"' in output
            sent = subprocess.run(
                [
                    str(VENV_BIN / "dodo-webhooks"),
                    "send-test",
                    "payment.succeeded",
                    "--data-dir",
                    str(data_dir),
                    "--json",
                ],
                env={**os.environ, **DEV_ENV, **given, "PYTHONPATH": str(ROOT)},
                capture_output=True,
                text=True,
                timeout=60,
                cwd=tmp_path,
            )
            assert sent.returncode == 0, sent.stderr
            webhook_id = json.loads(sent.stdout)["webhook_id"]
            wait_until(
                lambda: (
                    requests.get(
                        f"http://127.0.0.1:{port}/api/events/{webhook_id}",
                        headers={"Authorization": f"Bearer {token}"},
                        timeout=5,
                    ).json()["status"]
                    == "processed"
                ),
                timeout=60,
                what=f"event processed; output:\n{dev.output()}",
            )
            os.killpg(dev.pid, signal.SIGINT)
            assert dev.proc.wait(timeout=45) == 0, dev.output()
            output = dev.output()
        finally:
            dev.stop(signal.SIGKILL)
        hidden = [SECRET, SECRET.removeprefix("whsec_"), OLD_SECRET, token]
        assert not [h for h in hidden if h in output]
        written = {p: p.read_bytes() for p in data_dir.rglob("*") if p.is_file()}
        assert {p.name for p in (data_dir / "logs").iterdir()} == {
            "ingest.log",
            "worker.log",
            "beat.log",
        }
        assert b"POST /webhooks/dodo 202" in written[data_dir / "logs" / "ingest.log"]
        leaks = [(p, h) for p, data in written.items() for h in hidden if h.encode() in data]
        assert not leaks

    def test_dev_whose_reader_left_stops_everything_quietly(self, tmp_path: Path) -> None:
        """`dodo-webhooks dev | head -3`: no traceback, the children stopped, the port free."""
        port = free_port()
        dev = subprocess.Popen(
            [str(VENV_BIN / "dodo-webhooks"), "dev", "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **DEV_ENV, "PYTHONPATH": str(ROOT)},
            cwd=tmp_path,
            start_new_session=True,
        )
        try:
            assert dev.stdout is not None and dev.stderr is not None
            first = [dev.stdout.readline() for _ in range(3)]
            assert first[0].startswith(b"dev: migrating")
            dev.stdout.close()
            assert dev.wait(timeout=90) == OUTPUT_CLOSED
            with dev.stderr:
                assert dev.stderr.read() == b""
        finally:
            if dev.poll() is None:
                os.killpg(dev.pid, signal.SIGKILL)
                dev.wait()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # the ingest let go of it


class TestDevSettings:
    def test_generated_secret_and_token_are_kept_across_runs(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("DODO_PAYMENTS_WEBHOOK_KEY", raising=False)
        monkeypatch.delenv("ADMIN_TOKEN", raising=False)
        first = dev_settings(tmp_path, 8000, 6400)
        first.write()
        second = dev_settings(tmp_path, 8001, 6401)
        assert second.webhook_key == first.webhook_key
        assert second.admin_token == first.admin_token
        assert first.webhook_key.startswith("whsec_")

    def test_secret_from_the_environment_wins_and_is_not_written(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        own = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
        monkeypatch.setenv("DODO_PAYMENTS_WEBHOOK_KEY", own)
        settings = dev_settings(tmp_path, 8000, 6400)
        settings.write()
        assert settings.child_env()["DODO_PAYMENTS_WEBHOOK_KEY"] == own
        assert "DODO_PAYMENTS_WEBHOOK_KEY" not in read_env_file(tmp_path / DEV_ENV_FILE)

    def test_admin_token_from_the_environment_is_not_written(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("ADMIN_TOKEN", "admin-token-from-the-environment-42")
        settings = dev_settings(tmp_path, 8000, 6400)
        settings.write()
        assert settings.child_env()["ADMIN_TOKEN"] == "admin-token-from-the-environment-42"
        assert "ADMIN_TOKEN" not in read_env_file(tmp_path / DEV_ENV_FILE)
        assert "admin-token" not in (tmp_path / DEV_ENV_FILE).read_text()

    def test_malformed_secret_in_the_environment_is_one_line_naming_it(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("DODO_PAYMENTS_WEBHOOK_KEY", "whsec_!!!")
        with pytest.raises(DevError, match=r"^DODO_PAYMENTS_WEBHOOK_KEY: secret #1 is not"):
            dev_settings(tmp_path, 8000, 6400)

    def test_children_get_sqlite_in_the_data_dir_and_the_embedded_broker(
        self, tmp_path: Path
    ) -> None:
        env = dev_settings(tmp_path, 8000, 6400).child_env()
        assert env["DATABASE_URL"] == f"sqlite:///{tmp_path}/dodo-webhooks.db"
        assert env["REDIS_URL"] == "redis://127.0.0.1:6400/0"


class TestReadableLines:
    def test_a_json_step_line_becomes_one_short_line(self) -> None:
        line = json.dumps(
            {
                "ts": "2026-01-01T00:00:00.000Z",
                "level": "info",
                "logger": "dodo_webhooks.worker",
                "msg": "processed",
                "step": "processed",
                "webhook_id": "msg_1",
                "type": "payment.succeeded",
                "attempt": 1,
                "outcome": "applied",
            }
        )
        shown = readable(line)
        assert shown.split() == [
            "processed",
            "payment.succeeded",
            "webhook_id=msg_1",
            "attempt=1",
            "outcome=applied",
        ]

    def test_celery_per_task_noise_is_left_to_the_log_file(self) -> None:
        line = "[2026-01-01 00:00:00,000: INFO/MainProcess] Task workers.process_event[x] received"
        assert readable(line) == ""

    def test_errors_are_always_shown(self) -> None:
        assert "ERROR" in readable("[2026-01-01 00:00:00,000: ERROR/MainProcess] boom")


class TestDevConsoleLink:
    def test_banner_link_signs_in_once_and_never_shows_the_admin_token(
        self, tmp_path: Path
    ) -> None:
        port = free_port()
        dev = start_dev("dev-console", port, tmp_path / "data", tmp_path)
        try:
            output = dev.output()
            token = banner_value(output, "admin token")
            link = next(
                word.rstrip(")") for word in output.split() if "/console/login?once=" in word
            )
            assert link.startswith(f"http://127.0.0.1:{port}/console/login?once=")
            assert token not in link
            browser = requests.Session()
            answer = browser.get(link, timeout=10, allow_redirects=False)
            assert (answer.status_code, answer.headers["Location"]) == (302, "/console/")
            overview = browser.get(f"http://127.0.0.1:{port}/console/", timeout=10)
            assert overview.status_code == 200 and "Dead letters" in overview.text
            again = requests.get(link, timeout=10, allow_redirects=False)
            assert again.status_code == 401
        finally:
            dev.stop(signal.SIGKILL)


class TestBanner:
    def test_says_what_runs_and_prints_a_generated_secret_in_full(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("DODO_PAYMENTS_WEBHOOK_KEY", raising=False)
        monkeypatch.delenv("ADMIN_TOKEN", raising=False)
        settings = dev_settings(tmp_path, 8000, 6400)
        text = banner(settings, settings.write(), 2)
        assert (
            "processes     ingest (gunicorn, 2 workers), Celery worker "
            "(2 processes, --concurrency 2), beat"
        ) in text
        assert "1 Celery worker" not in text
        assert banner_value(text, "secret") == settings.webhook_key
        assert banner_value(text, "admin token") == settings.admin_token
        assert f"Bearer {settings.admin_token}" in text

    def test_masks_every_secret_and_the_token_from_the_environment(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("DODO_PAYMENTS_WEBHOOK_KEY", f"{SECRET} {OLD_SECRET}")
        monkeypatch.setenv("ADMIN_TOKEN", "admin-token-from-the-environment-42")
        settings = dev_settings(tmp_path, 8000, 6400)
        text = banner(settings, settings.write(), 1)
        assert "Celery worker (1 process, --concurrency 1)" in text
        assert f"secret        {mask(SECRET)} {mask(OLD_SECRET)}  (from DODO_PAYMENTS" in text
        for hidden in (SECRET.removeprefix("whsec_"), OLD_SECRET.removeprefix("whsec_")):
            assert hidden not in text
        assert "admin-token-from" not in text
        assert banner_value(text, "admin token") == "…t-42"


class TestMasking:
    def test_a_mask_keeps_the_prefix_and_the_last_four_characters(self) -> None:
        assert mask(SECRET) == "whsec_…LaSw"
        assert mask("admin-token-from-the-environment-42") == "…t-42"
        assert mask("short-token") == "…"  # too short to show any of it

    def test_a_string_too_short_to_be_a_secret_is_left_alone(self) -> None:
        assert masker(["dev"])(b"dev@host ready.") == b"dev@host ready."

    def test_a_childs_output_reaches_its_log_and_the_terminal_masked(self, tmp_path: Path) -> None:
        """A real child printing the secret, its key part and the token: none survives."""
        token = "admin-token-from-the-environment-42"
        script = (
            "import os; k = os.environ['DODO_PAYMENTS_WEBHOOK_KEY']; "
            "print('key', k, 'part', k[6:], 'token', os.environ['ADMIN_TOKEN'])"
        )
        child = Child("leaky", [sys.executable, "-c", script], tmp_path / "leaky.log")
        env = {**os.environ, "DODO_PAYMENTS_WEBHOOK_KEY": SECRET, "ADMIN_TOKEN": token}
        child.start(env, tmp_path)
        shown: list[str] = []
        pump = child.show_output(lambda _name, line: shown.append(line), masker([SECRET, token]))
        pump.join(timeout=30)
        child.stop(timeout=5)
        logged = (tmp_path / "leaky.log").read_text()
        assert logged.split() == ["key", mask(SECRET), "part", "…LaSw", "token", mask(token)]
        assert shown == [logged.rstrip("\n")]
