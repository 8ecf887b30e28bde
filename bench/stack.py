"""The processes a benchmark run starts and reaps: its database, redis-server, gunicorn, celery."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
PG_ADMIN_URL = os.environ.get(
    "BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)

# The production shape: gunicorn.conf.py's default worker count (2 x cores + 1, at most 8:
# sync workers wait on PostgreSQL and Redis, so more than one per core keeps the CPUs busy),
# passed explicitly to the ingest and its floor alike. Recorded in the results.
GUNICORN_FLAGS = ["-k", "sync", "--worker-tmp-dir", "/dev/shm", "--no-control-socket"]
GUNICORN_WORKERS = min(2 * len(os.sched_getaffinity(0)) + 1, 8)
CELERY_FLAGS = ["--without-gossip", "--without-mingle", "--loglevel=INFO"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], Any], *, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception as exc:  # the thing waited for may not answer yet
            last, value = exc, None
        if value:
            return value
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}: {last}")


class Process:
    """A child process in its own session, its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            argv,
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=timeout)
            except ProcessLookupError:
                pass
        self._log.close()


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes have used so far (/proc/<pid>/stat)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def postgres_cpu_seconds() -> float:
    """CPU time of every PostgreSQL process on the machine so far, backends that have exited
    included (they are in their postmaster's children's time, cutime + cstime)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "postgres":
                continue
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            parent = Path(f"/proc/{fields[1]}/comm").read_text().strip()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
        if parent != "postgres":  # a postmaster
            total += int(fields[13]) + int(fields[14])
    return total / ticks


def peak_rss_kib(pid: int) -> int | None:
    """VmHWM: the most resident memory the process ever had."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@contextmanager
def bench_database() -> Iterator[str]:
    """A fresh `dodo_bench_<random>` database, migrated, dropped afterwards."""
    from shared.migrate import upgrade

    name = f"dodo_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def redis_server(log_dir: Path) -> Iterator[str]:
    """A redis-server of the run's own, on a free port: no other test's queues, no persistence."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    data = log_dir / "redis"
    data.mkdir(exist_ok=True)
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data)]
    argv += ["--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction"]
    proc = Process(f"redis-{port}", argv, {}, log_dir)
    try:
        client = redis.Redis(port=port)
        wait_until(client.ping, timeout=15, what=f"redis-server on port {port}")
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.stop()


@contextmanager
def gunicorn(
    app: str, env: Mapping[str, str], log_dir: Path, name: str, workers: int = GUNICORN_WORKERS
) -> Iterator[Process]:
    """`gunicorn <app> -w N` with GUNICORN_FLAGS, on a free port (`proc.port`)."""
    port = free_port()
    argv = [str(VENV_BIN / "gunicorn"), "-b", f"127.0.0.1:{port}", "-w", str(workers)]
    argv += [*GUNICORN_FLAGS, app]
    proc = Process(f"gunicorn-{name}", argv, env, log_dir)
    proc.port = port  # type: ignore[attr-defined]
    try:

        def up() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                return sock.recv(64).startswith(b"HTTP/1.1 200")

        try:
            wait_until(
                lambda: proc.proc.poll() is None and up(), timeout=60, what=f"gunicorn {name}"
            )
            wait_until(
                lambda: len(children(proc.pid)) >= workers,
                timeout=30,
                what=f"gunicorn {name} workers",
            )
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n--- {proc.log_path}:\n{proc.output()[-3000:]}") from None
        yield proc
    finally:
        proc.stop()


@contextmanager
def celery_worker(
    app: str, concurrency: int, env: Mapping[str, str], log_dir: Path, name: str
) -> Iterator[Process]:
    """`celery -A <app> worker -c N` (prefork); yields once it logged `ready.`."""
    argv = [str(VENV_BIN / "celery"), "-A", app, "worker", "-n", f"{name}@%h"]
    argv += ["-c", str(concurrency), "-P", "prefork", *CELERY_FLAGS]
    proc = Process(f"celery-{name}", argv, env, log_dir)
    try:
        try:
            wait_until(
                lambda: proc.proc.poll() is None and " ready." in proc.output(),
                timeout=120,
                what=f"celery worker {name}",
            )
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n--- {proc.log_path}:\n{proc.output()[-3000:]}") from None
        yield proc
    finally:
        proc.stop()
