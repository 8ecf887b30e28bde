"""Gunicorn settings for `gunicorn "ingest:create_app()"`, read from ./gunicorn.conf.py by default.

Each setting comes from the environment (or ./.env, like every other setting), so the same
command runs on a host and in compose. Command-line flags and GUNICORN_CMD_ARGS still win.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

_dotenv = dotenv_values(".env") if Path(".env").is_file() else {}


def _setting(name: str, default: str = "") -> str:
    return os.environ.get(name) or _dotenv.get(name) or default


def _cores() -> int:
    # The CPUs this process may run on (a container's cpuset), not the host's count.
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# On a host the ingest listens on loopback behind a TLS proxy; compose sets 0.0.0.0:8000.
bind = _setting("GUNICORN_BIND", "127.0.0.1:8000").split(",")

# Each request is a signature check, one INSERT and one Redis push: sync workers suffice.
workers = int(
    _setting("GUNICORN_WORKERS") or _setting("WEB_CONCURRENCY") or min(2 * _cores() + 1, 8)
)
worker_class = "sync"
timeout = int(_setting("GUNICORN_TIMEOUT", "30"))
graceful_timeout = int(_setting("GUNICORN_GRACEFUL_TIMEOUT", "30"))
keepalive = int(_setting("GUNICORN_KEEPALIVE", "5"))

# Access lines carry nothing secret but are noise, one per delivery: GUNICORN_ACCESS_LOG=- shows.
accesslog = _setting("GUNICORN_ACCESS_LOG") or None
errorlog = "-"
loglevel = _setting("GUNICORN_LOG_LEVEL", "info")

# Heartbeat files on tmpfs: a worker never stalls on a slow or read-only disk (containers).
if Path("/dev/shm").is_dir():
    worker_tmp_dir = "/dev/shm"

# Gunicorn >= 25.1 opens a control socket at ~/.gunicorn/gunicorn.ctl by default; two instances
# on one host take it from each other. Opt in with GUNICORN_CONTROL_SOCKET=/path.
control_socket_disable = not _setting("GUNICORN_CONTROL_SOCKET")
if not control_socket_disable:
    control_socket = _setting("GUNICORN_CONTROL_SOCKET")


def on_starting(server: Any) -> None:
    """Check the ingest's configuration once, before any worker boots; and in Prometheus
    multiprocess mode, start from an empty directory (the client's rule)."""
    if str(getattr(getattr(server, "app", None), "app_uri", "")).startswith("ingest:"):
        # One line naming the variable, exit status 4, and no worker ever started.
        from ingest.app import preflight

        preflight()
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        for stale in Path(directory).glob("*.db"):
            stale.unlink()


def child_exit(server: Any, worker: Any) -> None:
    """A dead worker's live gauges leave /metrics (prometheus_client multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
