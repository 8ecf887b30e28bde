"""The processes a benchmark run starts and reaps: its database, redis-server, gunicorn, celery."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import redis

# One copy of the process helpers for the tests and the bench (re-exported for bench.run).
from tests.support import ROOT as ROOT
from tests.support import VENV_BIN as VENV_BIN
from tests.support import ManagedProcess as ManagedProcess
from tests.support import free_port, throwaway_database, wait_until

PG_ADMIN_URL = os.environ.get(
    "BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)

# The production shape: gunicorn.conf.py's default worker count (2 x cores + 1, at most 8:
# sync workers wait on PostgreSQL and Redis, so more than one per core keeps the CPUs busy),
# passed explicitly to the ingest and its floor alike. Recorded in the results.
GUNICORN_FLAGS = ["-k", "sync", "--worker-tmp-dir", "/dev/shm", "--no-control-socket"]
GUNICORN_WORKERS = min(2 * len(os.sched_getaffinity(0)) + 1, 8)
CELERY_FLAGS = ["--without-gossip", "--without-mingle", "--loglevel=INFO"]


# How long a stopped process gets between SIGTERM and SIGKILL; how often a wait polls.
STOP_TIMEOUT = 20.0
POLL = 0.05


@contextmanager
def log_on_timeout(proc: ManagedProcess) -> Iterator[None]:
    """A process that did not come up fails the run with the tail of its log."""
    try:
        yield
    except AssertionError as exc:  # tests.support.wait_until's timeout
        raise RuntimeError(f"{exc}\n--- {proc.log_path}:\n{proc.output()[-3000:]}") from None


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
    with throwaway_database(PG_ADMIN_URL, "dodo_bench") as url:
        yield url


@contextmanager
def redis_server(log_dir: Path) -> Iterator[str]:
    """A redis-server of the run's own, on a free port: no other test's queues, no persistence."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    data = log_dir / "redis"
    data.mkdir(exist_ok=True)
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data)]
    argv += ["--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction"]
    proc = ManagedProcess(f"redis-{port}", argv, {}, log_dir)
    try:
        client = redis.Redis(port=port)
        with log_on_timeout(proc):
            wait_until(client.ping, timeout=15, interval=POLL, what=f"redis-server on port {port}")
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.stop(timeout=STOP_TIMEOUT)


@contextmanager
def gunicorn(
    app: str, env: Mapping[str, str], log_dir: Path, name: str, workers: int = GUNICORN_WORKERS
) -> Iterator[ManagedProcess]:
    """`gunicorn <app> -w N` with GUNICORN_FLAGS, on a free port (`proc.port`)."""
    port = free_port()
    argv = [str(VENV_BIN / "gunicorn"), "-b", f"127.0.0.1:{port}", "-w", str(workers)]
    argv += [*GUNICORN_FLAGS, app]
    proc = ManagedProcess(f"gunicorn-{name}", argv, env, log_dir)
    proc.port = port  # type: ignore[attr-defined]
    try:

        def up() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                return sock.recv(64).startswith(b"HTTP/1.1 200")

        with log_on_timeout(proc):
            wait_until(
                lambda: proc.proc.poll() is None and up(),
                timeout=60,
                interval=POLL,
                what=f"gunicorn {name}",
            )
            wait_until(
                lambda: len(children(proc.pid)) >= workers,
                timeout=30,
                interval=POLL,
                what=f"gunicorn {name} workers",
            )
        yield proc
    finally:
        proc.stop(timeout=STOP_TIMEOUT)


@contextmanager
def celery_worker(
    app: str, concurrency: int, env: Mapping[str, str], log_dir: Path, name: str
) -> Iterator[ManagedProcess]:
    """`celery -A <app> worker -c N` (prefork); yields once it logged `ready.`."""
    argv = [str(VENV_BIN / "celery"), "-A", app, "worker", "-n", f"{name}@%h"]
    argv += ["-c", str(concurrency), "-P", "prefork", *CELERY_FLAGS]
    proc = ManagedProcess(f"celery-{name}", argv, env, log_dir)
    try:
        with log_on_timeout(proc):
            wait_until(
                lambda: proc.proc.poll() is None and " ready." in proc.output(),
                timeout=120,
                interval=POLL,
                what=f"celery worker {name}",
            )
        yield proc
    finally:
        proc.stop(timeout=STOP_TIMEOUT)
