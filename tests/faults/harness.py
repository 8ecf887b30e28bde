"""A whole dodo-webhooks deployment of the test's own, and the faults it can suffer.

`Stack` starts, on free ports and in a private temporary directory:
- a redis-server with append-only persistence (never the shared 6379),
- a PostgreSQL cluster (initdb + pg_ctl, run as the `postgres` OS user; it refuses root),
- the ingest under gunicorn, two `celery -A workers worker` processes and `celery -A workers beat`,
exactly as a user runs them, and offers the faults a production deployment meets: SIGKILL of a
worker or of a pool child, SIGSTOP, Redis killed (restarted with its data or empty), PostgreSQL
stopped in immediate mode, connections terminated, the ingest killed.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import redis
import requests
from sqlalchemy import Engine, create_engine, text

from cli.db import upgrade
from shared.db import make_engine
from shared.models import Base
from tests.support import VENV_BIN, ManagedProcess, free_port, service_env, wait_until

PG_BIN = Path(os.environ.get("FAULT_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_USER = "postgres"

# Small numbers, so that leases run out and re-drives happen within a test's patience.
MAX_ATTEMPTS = 4
LEASE_SECONDS = 8
REDRIVE_AFTER_SECONDS = 3
VISIBILITY_TIMEOUT = 60  # the settings' minimum
TUNING = {
    "MAX_ATTEMPTS": str(MAX_ATTEMPTS),
    "LEASE_SECONDS": str(LEASE_SECONDS),
    "REDRIVE_AFTER_SECONDS": str(REDRIVE_AFTER_SECONDS),
    "REDRIVE_INTERVAL_SECONDS": "1",
    "RETRY_BACKOFF_BASE_SECONDS": "0.5",
    "RETRY_BACKOFF_MAX_SECONDS": "4",
    "BROKER_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT),
}


def children(pid: int) -> list[int]:
    """Direct children of a process, from /proc (the prefork pool of a celery worker)."""
    found: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):
                found += [int(c) for c in (task / "children").read_text().split()]
    return found


class Redis:
    """redis-server with AOF in a directory of its own; killed and restarted at will."""

    def __init__(self, root: Path, fsync: str = "always") -> None:
        self.port = free_port()
        self.dir = root / "redis"
        self.dir.mkdir()
        self.fsync = fsync
        self.log = root / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        argv = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            self.fsync,
            "--save",
            "",
            "--maxmemory-policy",
            "noeviction",
        ]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port)
        wait_until(client.ping, timeout=20, what=f"redis-server on {self.port}")
        client.close()

    def kill(self) -> None:
        """SIGKILL: whatever was not fsynced is gone; with `always`, nothing acknowledged is."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def wipe(self) -> None:
        """Delete the persisted data, so the next start is an empty Redis."""
        shutil.rmtree(self.dir)
        self.dir.mkdir()

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(timeout=10)


class Postgres:
    """A PostgreSQL cluster of the test's own, run as the postgres OS user."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.data = root / "pgdata"
        self.sock = Path(tempfile.mkdtemp(prefix="pgsock-"))
        self.log = root / "postgres.log"
        self.database = "dodo_faults"
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{self.database}"
        self.admin_url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        user = pwd.getpwnam(PG_USER)
        os.chown(self.sock, user.pw_uid, user.pw_gid)
        self.data.mkdir(mode=0o700)
        os.chown(self.data, user.pw_uid, user.pw_gid)
        self.log.touch()
        os.chown(self.log, user.pw_uid, user.pw_gid)

    def _as_postgres(self, *argv: str, timeout: float = 120) -> None:
        subprocess.run(
            ["runuser", "-u", PG_USER, "--", *argv],
            check=True,
            timeout=timeout,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
        )

    def init(self) -> None:
        self._as_postgres(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "-U",
            PG_USER,
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        )
        self.start()
        admin = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.database}"'))
        admin.dispose()
        upgrade(self.url)

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=on "
            "-c max_connections=200"
        )
        self._as_postgres(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "stop")


class Stack:
    """Redis, PostgreSQL, the ingest, two workers and beat, all of the test's own."""

    def __init__(self, tuning: dict[str, str] | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="dodo-faults-"))
        self.root.chmod(0o755)
        self.logs = self.root / "logs"
        self.logs.mkdir()
        self.redis = Redis(self.root)
        self.pg = Postgres(self.root)
        self.ingest_port = free_port()
        self.url = f"http://127.0.0.1:{self.ingest_port}"
        self.env = service_env(
            self.pg.url, self.redis.url, **(TUNING if tuning is None else tuning)
        )
        self.ingest: ManagedProcess | None = None
        self.workers: dict[str, ManagedProcess] = {}
        self.beat: ManagedProcess | None = None
        self._generation = 0
        self._engine: Engine | None = None

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> Stack:
        self.redis.start()
        self.pg.init()
        self.start_ingest()
        for name in ("w1", "w2"):
            self.start_worker(name)
        self.start_beat()
        return self

    def close(self) -> None:
        for proc in [self.ingest, self.beat, *self.workers.values()]:
            if proc is not None:
                with contextlib.suppress(Exception):
                    os.killpg(proc.pid, signal.SIGCONT)
                proc.stop()
        if self._engine is not None:
            self._engine.dispose()
        self.pg.stop("immediate")
        self.redis.stop()
        if not os.environ.get("FAULT_KEEP"):
            shutil.rmtree(self.root, ignore_errors=True)
            shutil.rmtree(self.pg.sock, ignore_errors=True)

    def _name(self, base: str) -> str:
        self._generation += 1
        return f"{base}-{self._generation}"

    def start_ingest(self) -> None:
        self.ingest = ManagedProcess(
            self._name("ingest"),
            [
                str(VENV_BIN / "gunicorn"),
                "-b",
                f"127.0.0.1:{self.ingest_port}",
                "-w",
                "2",
                "--timeout",
                "60",
                "ingest:create_app()",
            ],
            # DEBUG: the `received` lines tell which deliveries a killed ingest never queued.
            {**self.env, "LOG_LEVEL": "DEBUG"},
            self.logs,
        )
        proc = self.ingest
        wait_until(
            lambda: requests.get(f"{self.url}/healthz", timeout=1).ok,
            timeout=60,
            what=f"gunicorn to answer; log:\n{proc.output()[-3000:]}",
        )

    def start_worker(self, name: str) -> ManagedProcess:
        proc = ManagedProcess(
            self._name(f"worker-{name}"),
            [
                str(VENV_BIN / "celery"),
                "-A",
                "workers",
                "worker",
                "-n",
                f"{name}-{self._generation}@%h",
                "-c",
                "2",
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
            ],
            self.env,
            self.logs,
        )
        wait_until(
            lambda: "ready." in proc.output(),
            timeout=90,
            what=f"celery worker {name} to be ready; log:\n{proc.output()[-3000:]}",
        )
        self.workers[name] = proc
        return proc

    def start_beat(self) -> None:
        self.beat = ManagedProcess(
            self._name("beat"),
            [
                str(VENV_BIN / "celery"),
                "-A",
                "workers",
                "beat",
                "-s",
                str(self.root / "beat-schedule"),
                "--loglevel=INFO",
            ],
            self.env,
            self.logs,
        )

    # -- the database -------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self.pg.url)
        return self._engine

    def reset(self) -> None:
        """Empty every table and queue between scenarios (the processes keep running)."""
        names = ", ".join(t.name for t in Base.metadata.sorted_tables)
        with self.engine.begin() as conn:
            conn.execute(text(f"TRUNCATE {names}"))

    def status_counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(text("SELECT status, count(*) FROM webhook_events GROUP BY status"))
            return {str(r[0]): int(r[1]) for r in rows}

    # -- faults -------------------------------------------------------------------------------

    def kill_worker_main(self, name: str) -> list[int]:
        """SIGKILL the worker's main process only; its orphaned pool children are reaped after."""
        proc = self.workers[name]
        pool = children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.proc.wait(timeout=10)
        proc.stop()  # closes its log; the group is not signalled, the main being gone
        return pool

    def reap(self, pids: list[int], timeout: float = 10) -> None:
        """Orphaned pool children exit on their own once their parent is gone; else SIGKILL."""
        deadline = time.monotonic() + timeout
        for pid in pids:
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.1)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def worker_of(self, pid: int) -> str:
        """The name of the worker whose main process is `pid` or the parent of `pid`."""
        for name, proc in self.workers.items():
            if pid == proc.pid or parent_of(pid) == proc.pid:
                return name
        raise LookupError(f"process {pid} belongs to no worker")

    def kill_pool_children(self, name: str) -> list[int]:
        """SIGKILL every prefork pool child of one worker; the main process stays."""
        pids = children(self.workers[name].pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def stop_worker(self, name: str) -> None:
        """SIGSTOP the worker's whole process group: main and pool children freeze mid-task."""
        os.killpg(self.workers[name].pid, signal.SIGSTOP)

    def cont_worker(self, name: str) -> None:
        os.killpg(self.workers[name].pid, signal.SIGCONT)

    def kill_ingest(self) -> None:
        """SIGKILL gunicorn's whole process group (master and workers) at once."""
        assert self.ingest is not None
        os.killpg(self.ingest.pid, signal.SIGKILL)
        self.ingest.proc.wait(timeout=10)
        self.ingest.stop()

    @contextlib.contextmanager
    def terminating_connections(self, every: float = 0.25) -> Iterator[list[int]]:
        """While inside, `pg_terminate_backend` every other connection to the database."""
        stop = threading.Event()
        killed: list[int] = []
        admin = create_engine(self.pg.admin_url, isolation_level="AUTOCOMMIT")

        def loop() -> None:
            while not stop.is_set():
                with contextlib.suppress(Exception), admin.connect() as conn:
                    rows = conn.execute(
                        text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = :db AND pid <> pg_backend_pid()"
                        ),
                        {"db": self.pg.database},
                    ).all()
                    killed.append(sum(1 for r in rows if r[0]))
                stop.wait(every)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            yield killed
        finally:
            stop.set()
            thread.join(timeout=10)
            admin.dispose()


def process_of_backend(engine: Engine, backend_pid: int) -> int | None:
    """The local process on the client end of a PostgreSQL backend's TCP connection."""
    with engine.connect() as conn:
        port = conn.execute(
            text("SELECT client_port FROM pg_stat_activity WHERE pid = :pid"), {"pid": backend_pid}
        ).scalar()
    if not port:
        return None
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    found = re.search(r"pid=(\d+)", out)
    return int(found.group(1)) if found else None


def parent_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^PPid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
