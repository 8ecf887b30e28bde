"""docker-compose.yml: a valid file, and every service's own command working on this host.

No Docker engine runs here, so the file is resolved by `docker-compose config` and each
service's command is run as written, with only container addresses swapped for host ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import runpy
import shlex
import shutil
import signal
import socket
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
import requests
import yaml
from sqlalchemy import inspect
from sqlalchemy.engine import Engine, make_url

from shared.catalog import EVENT_QUEUES, MAINTENANCE_QUEUE
from shared.db import make_engine, utcnow
from shared.models import EventStatus, WebhookEvent
from shared.settings import Settings
from tests.conftest import PG_ADMIN_URL
from tests.support import (
    ADMIN_TOKEN,
    OLD_SECRET,
    ROOT,
    SECRET,
    VENV_BIN,
    ManagedProcess,
    envelope,
    free_port,
    signed_headers,
    throwaway_database,
    wait_until,
)

COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DEDICATED_FILE = ROOT / "docker-compose.dedicated.yml"
REDIS_PASSWORD = "redis-pw-0123"
FLOWER_LOGIN = ("ops", "flower-pw-4567")
# What an operator fills into .env.example; commas separate the secrets (docker-compose safe).
FILLED_IN = {
    "DODO_PAYMENTS_WEBHOOK_KEY": f"{SECRET},{OLD_SECRET}",
    "ADMIN_TOKEN": ADMIN_TOKEN,
    "POSTGRES_PASSWORD": "pg-pw-89ab",
    "REDIS_PASSWORD": REDIS_PASSWORD,
    "FLOWER_BASIC_AUTH": ":".join(FLOWER_LOGIN),
}
APP_SERVICES = ("migrate", "ingest", "worker", "beat", "flower")


def docker_compose() -> str:
    found = shutil.which("docker-compose")
    assert found, "docker-compose is not installed (apt-get install docker-compose; make test does)"
    return found


def write_dotenv(directory: Path, values: dict[str, str]) -> Path:
    """.env.example with the blanks an operator must fill set to `values`."""
    lines = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        name = line.split("=", 1)[0]
        lines.append(f"{name}={values[name]}" if "=" in line and name in values else line)
    path = directory / ".env"
    path.write_text("\n".join(lines) + "\n")
    return path


def compose_config(
    project: Path, *extra: str, files: tuple[Path, ...] = (COMPOSE_FILE,)
) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` of the repository's file with `project/.env` as the user's .env."""
    return subprocess.run(
        [
            docker_compose(),
            *(f"--file={path}" for path in files),
            "--project-directory",
            str(project),
            "--env-file",
            str(project / ".env"),
            "config",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def resolved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The compose file as `docker compose up` sees it once .env.example is filled in."""
    project = tmp_path_factory.mktemp("compose-project")
    write_dotenv(project, FILLED_IN)
    result = compose_config(project)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def service(config: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = config["services"][name]
    return found


def argv_of(config: dict[str, Any], name: str) -> list[str]:
    command = service(config, name)["command"]
    return shlex.split(command) if isinstance(command, str) else [str(w) for w in command]


def environment_of(config: dict[str, Any], name: str) -> dict[str, str]:
    env = service(config, name).get("environment") or {}
    return {key: str(value) for key, value in env.items() if value is not None}


def published(port: str | dict[str, Any]) -> tuple[str, str]:
    """(host address, host port) of a `ports` entry in either of compose's spellings."""
    if isinstance(port, dict):
        return str(port.get("host_ip", "")), str(port.get("published", ""))
    parts = port.split("/")[0].split(":")
    return (parts[0], parts[1]) if len(parts) == 3 else ("", parts[0])


class TestComposeFile:
    def test_is_valid_once_the_env_file_is_filled_in(self, tmp_path: Path) -> None:
        write_dotenv(tmp_path, FILLED_IN)
        result = compose_config(tmp_path, "-q")
        assert result.returncode == 0, result.stderr

    def test_refuses_to_start_while_the_passwords_are_blank(self, tmp_path: Path) -> None:
        """`cp .env.example .env && docker compose up` stops at once, naming what is missing."""
        write_dotenv(tmp_path, {})
        result = compose_config(tmp_path, "-q")
        assert result.returncode != 0
        assert "in .env" in result.stderr

    def test_redis_and_postgres_publish_no_host_ports(self, resolved: dict[str, Any]) -> None:
        for name in ("redis", "postgres"):
            assert "ports" not in service(resolved, name), name

    def test_flower_is_published_on_loopback_only(self, resolved: dict[str, Any]) -> None:
        ports = service(resolved, "flower")["ports"]
        assert ports
        assert all(published(port)[0] == "127.0.0.1" for port in ports), ports

    def test_ingest_publishes_its_port(self, resolved: dict[str, Any]) -> None:
        assert [published(port)[1] for port in service(resolved, "ingest")["ports"]] == ["8000"]

    def test_worker_can_be_scaled(self, resolved: dict[str, Any]) -> None:
        """`--scale worker=4` needs no fixed container name and no host port."""
        worker = service(resolved, "worker")
        assert "container_name" not in worker
        assert "ports" not in worker

    def test_services_start_in_dependency_order(self, resolved: dict[str, Any]) -> None:
        healthy, done = "service_healthy", "service_completed_successfully"
        expected = {
            "migrate": {"postgres": healthy},
            "ingest": {"migrate": done, "postgres": healthy, "redis": healthy},
            "worker": {"migrate": done, "postgres": healthy, "redis": healthy},
            "beat": {"migrate": done, "redis": healthy},
            "flower": {"redis": healthy},
        }
        for name, conditions in expected.items():
            depends_on = service(resolved, name)["depends_on"]
            assert {k: v["condition"] for k, v in depends_on.items()} == conditions, name

    def test_every_awaited_service_has_a_health_check(self, resolved: dict[str, Any]) -> None:
        for name in ("redis", "postgres", "ingest", "flower", "worker"):
            assert service(resolved, name)["healthcheck"]["test"], name

    def test_migrate_runs_once(self, resolved: dict[str, Any]) -> None:
        assert service(resolved, "migrate")["restart"] == "no"
        assert argv_of(resolved, "migrate") == ["dodo-webhooks", "db", "upgrade"]

    def test_redis_is_durable_never_evicts_and_needs_a_password(
        self, resolved: dict[str, Any]
    ) -> None:
        argv = argv_of(resolved, "redis")
        options = dict(zip(argv[1::2], argv[2::2], strict=True))
        assert options["--appendonly"] == "yes"
        assert options["--maxmemory-policy"] == "noeviction"
        assert options["--requirepass"] == REDIS_PASSWORD
        assert service(resolved, "redis")["image"].startswith("redis:7")

    def test_data_lives_on_named_volumes(self, resolved: dict[str, Any]) -> None:
        assert {"redis-data", "postgres-data"} <= set(resolved["volumes"])
        mounts = {
            name: [str(v).split(":")[:2] for v in service(resolved, name)["volumes"]]
            for name in ("redis", "postgres")
        }
        assert ["redis-data", "/data"] in mounts["redis"]
        assert ["postgres-data", "/var/lib/postgresql/data"] in mounts["postgres"]

    def test_app_services_reach_redis_with_its_password(self, resolved: dict[str, Any]) -> None:
        for name in APP_SERVICES:
            env = environment_of(resolved, name)
            assert env["REDIS_URL"] == f"redis://:{REDIS_PASSWORD}@redis:6379/0", name
            assert make_url(env["DATABASE_URL"]).password == FILLED_IN["POSTGRES_PASSWORD"]
            assert make_url(env["DATABASE_URL"]).host == "postgres"

    def test_flower_requires_credentials(self, resolved: dict[str, Any]) -> None:
        env = environment_of(resolved, "flower")
        assert env["FLOWER_BASIC_AUTH"] == ":".join(FLOWER_LOGIN)
        assert "FLOWER_UNAUTHENTICATED_API" not in env
        assert "FLOWER_UNAUTHENTICATED_API" not in COMPOSE_FILE.read_text()

    def test_services_run_the_commands_of_the_design(self, resolved: dict[str, Any]) -> None:
        assert argv_of(resolved, "ingest") == ["gunicorn", "ingest:create_app()"]
        assert argv_of(resolved, "worker")[:4] == ["celery", "-A", "workers", "worker"]
        assert argv_of(resolved, "beat")[:4] == ["celery", "-A", "workers", "beat"]
        assert argv_of(resolved, "flower") == ["celery", "-A", "workers", "flower"]


class TestDedicatedWorkers:
    def test_every_queue_keeps_a_consumer(self, tmp_path: Path) -> None:
        """docker-compose.dedicated.yml splits the queues between workers and forgets none."""
        write_dotenv(tmp_path, FILLED_IN)
        result = compose_config(tmp_path, files=(COMPOSE_FILE, DEDICATED_FILE))
        assert result.returncode == 0, result.stderr
        config = yaml.safe_load(result.stdout)
        consumed: dict[str, list[str]] = {}
        for name in ("worker", "worker-credits"):
            argv = argv_of(config, name)
            assert argv[:4] == ["celery", "-A", "workers", "worker"]
            queues = argv[argv.index("-Q") + 1].split(",")
            for queue in queues:
                consumed.setdefault(queue, []).append(name)
        assert consumed["credits"] == ["worker-credits"]
        assert sorted(consumed) == sorted([*EVENT_QUEUES, MAINTENANCE_QUEUE])
        assert all(len(names) == 1 for names in consumed.values())


class TestEnvExample:
    def test_documents_every_setting(self) -> None:
        text = ENV_EXAMPLE.read_text()
        names = [name.upper() for name in Settings.model_fields]
        names += ["POSTGRES_PASSWORD", "REDIS_PASSWORD", "FLOWER_BASIC_AUTH"]
        missing = [n for n in names if f"{n}=" not in text]
        assert not missing

    def test_each_variable_has_a_comment_above_it(self) -> None:
        lines = ENV_EXAMPLE.read_text().splitlines()
        for index, line in enumerate(lines):
            if "=" in line and not line.startswith("# "):
                assert lines[index - 1].startswith("#"), line


class TestDockerfile:
    def test_installs_dependencies_before_copying_the_source(self) -> None:
        """A code change must not reinstall every dependency: pyproject.toml comes first."""
        joined = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
        steps = [
            line.split(None, 1) for line in joined.splitlines() if line and not line.startswith("#")
        ]
        instructions = [(step[0], step[1] if len(step) > 1 else "") for step in steps]
        assert instructions[0] == ("FROM", "python:3.11-slim")
        copies = [args for op, args in instructions if op == "COPY"]
        assert copies[0] == "pyproject.toml ./"
        install_deps = next(i for i, (op, a) in enumerate(instructions) if "requirements" in a)
        source = next(i for i, (op, a) in enumerate(instructions) if a.startswith("shared"))
        assert install_deps < source
        assert ("USER", "app") in instructions
        assert instructions[-1] == ("CMD", '["gunicorn", "ingest:create_app()"]')

    def test_copies_every_package_the_project_installs(self) -> None:
        """The `migrate` service runs `dodo-webhooks db upgrade`, which lives in cli/."""
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())
        packages = {
            p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]
        }
        copied = {
            line.split()[1]
            for line in (ROOT / "Dockerfile").read_text().splitlines()
            if line.startswith("COPY ")
        }
        assert packages <= copied, packages - copied

    def test_dockerignore_keeps_secrets_out_of_the_image(self) -> None:
        ignored = (ROOT / ".dockerignore").read_text().splitlines()
        assert {".env", ".git", ".venv"} <= set(ignored)


class TestGunicornConfig:
    def load(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **env: str) -> dict[str, Any]:
        monkeypatch.chdir(tmp_path)  # no developer's .env
        for name in ("GUNICORN_BIND", "GUNICORN_WORKERS", "WEB_CONCURRENCY", "GUNICORN_ACCESS_LOG"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return runpy.run_path(str(ROOT / "gunicorn.conf.py"))

    def test_binds_loopback_with_quiet_access_log_by_default(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        config = self.load(monkeypatch, tmp_path)
        assert config["bind"] == ["127.0.0.1:8000"]
        assert 1 <= config["workers"] <= 8
        assert config["accesslog"] is None
        assert config["control_socket_disable"] is True

    def test_bind_and_workers_come_from_the_environment(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        config = self.load(
            monkeypatch, tmp_path, GUNICORN_BIND="0.0.0.0:8000", GUNICORN_WORKERS="3"
        )
        assert (config["bind"], config["workers"]) == (["0.0.0.0:8000"], 3)

    def test_settings_are_read_from_dotenv_too(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        (tmp_path / ".env").write_text("GUNICORN_WORKERS=5\nGUNICORN_ACCESS_LOG=-\n")
        config = self.load(monkeypatch, tmp_path)
        assert (config["workers"], config["accesslog"]) == (5, "-")

    def test_child_exit_drops_the_dead_workers_live_gauges(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        metrics = tmp_path / "prom"
        config = self.load(monkeypatch, tmp_path, PROMETHEUS_MULTIPROC_DIR=str(metrics))
        config["on_starting"](None)
        (metrics / "gauge_livesum_111.db").touch()
        (metrics / "gauge_livesum_222.db").touch()
        (metrics / "counter_111.db").touch()
        config["child_exit"](None, SimpleNamespace(pid=111))
        remaining = sorted(p.name for p in metrics.iterdir())
        assert remaining == ["counter_111.db", "gauge_livesum_222.db"]

    def test_on_starting_wipes_metric_files_of_a_previous_run(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        metrics = tmp_path / "prom"
        metrics.mkdir()
        (metrics / "counter_999.db").touch()
        config = self.load(monkeypatch, tmp_path, PROMETHEUS_MULTIPROC_DIR=str(metrics))
        config["on_starting"](None)
        assert list(metrics.iterdir()) == []


def host_argv(argv: list[str]) -> list[str]:
    """The command as written, its program taken from this virtualenv when it lives there."""
    program = VENV_BIN / argv[0]
    return [str(program) if program.exists() else argv[0], *argv[1:]]


class TestFlowerAuthentication:
    """flowerconfig.py: no dashboard without credentials."""

    def flower(
        self, tmp_path: Path, redis_url: str, resolved: dict[str, Any]
    ) -> tuple[ManagedProcess, str]:
        # Flower reads flowerconfig.py (and .env) from its working directory: a copy in tmp_path
        # keeps a developer's own .env out of the test.
        shutil.copy(ROOT / "flowerconfig.py", tmp_path / "flowerconfig.py")
        port = free_port()
        proc = ManagedProcess(
            "flower-alone",
            [
                "/bin/sh",
                "-c",
                f'cd "{tmp_path}" && exec "$@"',
                "sh",
                *host_argv(argv_of(resolved, "flower")),
            ],
            {
                "REDIS_URL": redis_url,
                "FLOWER_PORT": str(port),
                "FLOWER_ADDRESS": "127.0.0.1",
            },
            tmp_path,
        )
        return proc, f"http://127.0.0.1:{port}"

    def test_refuses_to_start_without_credentials(
        self,
        tmp_path: Path,
        redis_url: str,
        resolved: dict[str, Any],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.delenv("FLOWER_BASIC_AUTH", raising=False)
        proc, _ = self.flower(tmp_path, redis_url, resolved)
        try:
            assert proc.proc.wait(timeout=60) == 2
            assert "FLOWER_BASIC_AUTH is not set" in proc.output()
            assert "Visit me" not in proc.output()
        finally:
            proc.stop()

    def test_reads_credentials_from_dotenv(
        self,
        tmp_path: Path,
        redis_url: str,
        resolved: dict[str, Any],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.delenv("FLOWER_BASIC_AUTH", raising=False)
        (tmp_path / ".env").write_text("FLOWER_BASIC_AUTH=alice:s3cret\n")
        proc, url = self.flower(tmp_path, redis_url, resolved)
        try:
            wait_until(
                lambda: requests.get(f"{url}/", timeout=2).status_code == 401,
                timeout=60,
                what=f"flower to answer 401; log:\n{proc.output()}",
            )
            assert requests.get(f"{url}/", auth=("alice", "s3cret"), timeout=5).status_code == 200
            assert requests.get(f"{url}/", auth=("alice", "wrong"), timeout=5).status_code == 401
        finally:
            proc.stop()


@dataclass
class Stack:
    """Every compose service's command running on this host, as one deployment."""

    resolved: dict[str, Any]
    engine: Engine
    redis_port: int
    ingest: str
    flower: str
    migrate: subprocess.CompletedProcess[str]
    processes: dict[str, ManagedProcess] = field(default_factory=dict)
    envs: dict[str, dict[str, str]] = field(default_factory=dict)
    schedule_dir: Path = Path()

    def event_status(self, webhook_id: str) -> str:
        answer = requests.get(
            f"{self.ingest}/api/events/{webhook_id}",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=5,
        )
        return str(answer.json().get("status")) if answer.ok else ""

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{p.output()[-3000:]}" for n, p in self.processes.items())


@pytest.fixture(scope="module")
def empty_database() -> Iterator[str]:
    """A database with no schema at all: what `migrate` finds on a first `docker compose up`."""
    with throwaway_database(PG_ADMIN_URL, "dodo_compose", migrated=False) as url:
        yield url


@pytest.fixture(scope="module")
def stack(
    resolved: dict[str, Any], empty_database: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("compose-logs")
    schedule_dir = tmp_path_factory.mktemp("beat")

    # Redis exactly as compose runs it, plus where to listen and write on this host.
    redis_port = free_port()
    redis_server = ManagedProcess(
        "redis",
        [
            shutil.which("redis-server") or "/usr/bin/redis-server",
            *argv_of(resolved, "redis")[1:],
            *("--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(logs)),
        ],
        {},
        logs,
    )
    processes = {"redis": redis_server}
    try:
        client = redis.Redis(port=redis_port, password=REDIS_PASSWORD)
        wait_until(client.ping, timeout=20, what=f"redis; log:\n{redis_server.output()}")
        client.close()

        ingest_port, flower_port = free_port(), free_port()
        host_addresses = {
            "DATABASE_URL": empty_database,
            "REDIS_URL": f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis_port}/0",
            "GUNICORN_BIND": f"127.0.0.1:{ingest_port}",
            "FLOWER_PORT": str(flower_port),
            "FLOWER_ADDRESS": "127.0.0.1",
            "GUNICORN_WORKERS": "2",  # a shared 2-core test machine
            "BEAT_SCHEDULE_FILE": str(schedule_dir / "celerybeat-schedule"),
            # Fast re-drive, so the test sees beat at work within seconds.
            "REDRIVE_INTERVAL_SECONDS": "1",
            "REDRIVE_AFTER_SECONDS": "1",
        }

        def env_for(name: str) -> dict[str, str]:
            return {**environment_of(resolved, name), **host_addresses}

        migrate = subprocess.run(
            host_argv(argv_of(resolved, "migrate")),
            env={**os.environ, "PYTHONPATH": str(ROOT), **env_for("migrate")},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert migrate.returncode == 0, migrate.stdout + migrate.stderr

        envs = {name: env_for(name) for name in ("ingest", "worker", "beat", "flower")}
        for name, env in envs.items():
            processes[name] = ManagedProcess(name, host_argv(argv_of(resolved, name)), env, logs)

        engine = make_engine(empty_database)
        built = Stack(
            resolved=resolved,
            engine=engine,
            redis_port=redis_port,
            ingest=f"http://127.0.0.1:{ingest_port}",
            flower=f"http://127.0.0.1:{flower_port}",
            migrate=migrate,
            processes=processes,
            envs=envs,
            schedule_dir=schedule_dir,
        )
        wait_until(
            lambda: requests.get(f"{built.ingest}/healthz", timeout=2).ok,
            timeout=60,
            what=f"the ingest; logs:\n{built.logs()}",
        )
        wait_until(
            lambda: "ready." in processes["worker"].output(),
            timeout=90,
            what=f"the worker; logs:\n{built.logs()}",
        )
        yield built
        engine.dispose()
    finally:
        # Signal every process first, so their shutdowns overlap.
        for proc in processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(processes.values()):
            proc.stop()


@pytest.mark.slow
class TestServicesOnHost:
    """Each service's command from docker-compose.yml, run on this host against real services."""

    def test_migrate_creates_the_schema_in_an_empty_database(self, stack: Stack) -> None:
        assert "is at revision head" in stack.migrate.stdout
        assert "webhook_events" in inspect(stack.engine).get_table_names()

    def test_redis_refuses_clients_without_the_password(self, stack: Stack) -> None:
        # A raw socket: redis-py retries a refused handshake with backoff, for seconds.
        with socket.create_connection(("127.0.0.1", stack.redis_port), timeout=5) as sock:
            sock.sendall(b"PING\r\n")
            assert sock.recv(100).startswith(b"-NOAUTH")

    def test_redis_health_check_passes_only_with_the_password(self, stack: Stack) -> None:
        check = service(stack.resolved, "redis")["healthcheck"]["test"]
        assert check[0] == "CMD-SHELL"
        shell = check[1].replace("redis-cli", f"redis-cli -p {stack.redis_port}")
        path = {"PATH": os.environ["PATH"]}
        redis_env = {**path, **environment_of(stack.resolved, "redis")}
        ok = subprocess.run(["/bin/sh", "-c", shell], env=redis_env, timeout=30, check=False)
        refused = subprocess.run(["/bin/sh", "-c", shell], env=path, timeout=30, check=False)
        assert (ok.returncode, refused.returncode != 0) == (0, True)

    def test_postgres_health_check_passes(self, stack: Stack) -> None:
        check = service(stack.resolved, "postgres")["healthcheck"]["test"]
        database = make_url(str(stack.engine.url)).database or ""
        shell = check[1].replace("dodo_webhooks", database)
        assert subprocess.run(["/bin/sh", "-c", shell], timeout=30, check=False).returncode == 0

    def test_ingest_answers_liveness_and_readiness(self, stack: Stack) -> None:
        assert requests.get(f"{stack.ingest}/healthz", timeout=5).status_code == 200
        ready = requests.get(f"{stack.ingest}/readyz", timeout=5)
        assert (ready.status_code, ready.json()["status"]) == (200, "ready")

    def test_ingest_health_check_passes(self, stack: Stack) -> None:
        check = service(stack.resolved, "ingest")["healthcheck"]["test"]
        port = stack.ingest.rsplit(":", 1)[1]
        argv = [word.replace(":8000/", f":{port}/") for word in check[1:]]
        argv[0] = str(VENV_BIN / "python")
        assert subprocess.run(argv, timeout=30, check=False).returncode == 0

    def test_worker_health_check_pings_this_worker(self, stack: Stack) -> None:
        check = service(stack.resolved, "worker")["healthcheck"]["test"]
        assert check[0] == "CMD-SHELL"
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
            # Docker sets HOSTNAME to the container's, which is also the worker's node name.
            "HOSTNAME": socket.gethostname(),
            **stack.envs["worker"],
        }
        shell = check[1].replace("$$", "$")  # compose's escape for a literal $
        result = subprocess.run(
            ["/bin/sh", "-c", shell], env=env, cwd=ROOT, timeout=60, check=False
        )
        assert result.returncode == 0

    def test_signed_delivery_is_acknowledged_then_processed_by_the_worker(
        self, stack: Stack
    ) -> None:
        body = envelope("payout.created", {"payout_id": "po_c1"}, timestamp="2026-01-01T00:00:00Z")
        answer = requests.post(
            f"{stack.ingest}/webhooks/dodo",
            data=body,
            headers=signed_headers(body, webhook_id="msg_compose_1", secret=OLD_SECRET),
            timeout=10,
        )
        assert answer.status_code == 202, answer.text
        wait_until(
            lambda: stack.event_status("msg_compose_1") == "ignored",
            timeout=60,
            what=f"the event to be processed; logs:\n{stack.logs()}",
        )

    def test_beat_redrives_a_pending_event_nobody_queued(self, stack: Stack) -> None:
        """An event recorded but never queued (Redis lost it) is queued again and processed."""
        body = envelope("payout.failed", {"payout_id": "po_c2"}, timestamp="2026-01-01T00:00:00Z")
        now = utcnow()
        with stack.engine.begin() as conn:
            conn.execute(
                WebhookEvent.__table__.insert().values(  # type: ignore[attr-defined]
                    webhook_id="msg_compose_stuck",
                    type="payout.failed",
                    status=EventStatus.PENDING,
                    attempts=0,
                    body=body.encode(),
                    headers={},
                    webhook_ts=int(now.timestamp()),
                    event_at=now,
                    received_at=now - timedelta(hours=1),
                    enqueued_at=now - timedelta(hours=1),
                )
            )
        wait_until(
            lambda: stack.event_status("msg_compose_stuck") == "ignored",
            timeout=60,
            what=f"beat to re-drive the event; logs:\n{stack.logs()}",
        )
        assert "Sending due task redrive-stuck-events" in stack.processes["beat"].output()

    def test_beat_keeps_its_schedule_where_it_is_told(self, stack: Stack) -> None:
        """BEAT_SCHEDULE_FILE: a read-only container points it at its tmpfs."""
        wait_until(
            lambda: list(stack.schedule_dir.glob("celerybeat-schedule*")),
            timeout=30,
            what="beat's schedule file",
        )

    def test_flower_answers_401_without_credentials(self, stack: Stack) -> None:
        wait_until(
            lambda: requests.get(f"{stack.flower}/", timeout=2).status_code == 401,
            timeout=60,
            what=f"flower; logs:\n{stack.logs()}",
        )
        for path in ("/", "/workers", "/api/workers", "/tasks", "/metrics"):
            assert requests.get(f"{stack.flower}{path}", timeout=5).status_code == 401, path
        wrong = requests.get(f"{stack.flower}/api/workers", auth=("ops", "guess"), timeout=5)
        assert wrong.status_code == 401

    def test_flower_lists_the_worker_to_its_operator(self, stack: Stack) -> None:
        worker_name = f"celery@{socket.gethostname()}"

        def workers() -> dict[str, Any]:
            answer = requests.get(
                f"{stack.flower}/api/workers",
                params={"refresh": "1"},
                auth=FLOWER_LOGIN,
                timeout=10,
            )
            answer.raise_for_status()
            listed: dict[str, Any] = json.loads(answer.text)
            return listed

        listed = wait_until(
            lambda: worker_name in workers() and workers(),
            timeout=60,
            interval=1,
            what=f"flower to list {worker_name}; logs:\n{stack.logs()}",
        )
        assert worker_name in listed

    def test_flower_health_check_passes(self, stack: Stack) -> None:
        check = service(stack.resolved, "flower")["healthcheck"]["test"]
        port = stack.flower.rsplit(":", 1)[1]
        argv = [word.replace(":5555/", f":{port}/") for word in check[1:]]
        argv[0] = str(VENV_BIN / "python")
        wait_until(
            lambda: subprocess.run(argv, timeout=30, check=False).returncode == 0,
            timeout=60,
            interval=1,
            what="flower's health check",
        )

    def test_flower_metrics_answer_its_operator(self, stack: Stack) -> None:
        wait_until(lambda: requests.get(f"{stack.flower}/healthcheck", timeout=2).ok, timeout=60)
        answer = requests.get(f"{stack.flower}/metrics", auth=FLOWER_LOGIN, timeout=10)
        assert answer.status_code == 200
        assert "flower_events_total" in answer.text
