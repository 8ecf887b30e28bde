"""Test helpers: signing deliveries, and real processes (gunicorn, celery) started and reaped."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
from flask.testing import FlaskClient
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from standardwebhooks.webhooks import Webhook
from werkzeug.test import TestResponse

from shared.bodies import fill
from shared.models import WebhookEvent

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OLD_SECRET = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"
ADMIN_TOKEN = "test-admin-token"
# The user property a fault test's report carries its scenario's figures in (tests/faults/
# conftest.py puts them there; tests/conftest.py prints them in the terminal summary).
FAULT_FIGURES_PROPERTY = "fault_figures"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def throwaway_database(admin_url: str, prefix: str, *, migrated: bool = True) -> Iterator[str]:
    """A new database `<prefix>_<random>` beside `admin_url`'s, migrated with Alembic unless
    told not to; its URL, and it is dropped afterwards (also when the migration fails)."""
    from cli.db import upgrade

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        if migrated:
            upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def signed_headers(
    body: str | bytes,
    *,
    webhook_id: str,
    secret: str = SECRET,
    at: datetime | None = None,
) -> dict[str, str]:
    """Headers as Dodo sends them, signed by the standardwebhooks library itself."""
    at = at or datetime.now(UTC)
    text = body.decode() if isinstance(body, bytes) else body
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(webhook_id, at, text),
        "content-type": "application/json",
    }


def envelope(event_type: str, data: Mapping[str, Any], *, timestamp: datetime | str) -> str:
    ts = timestamp if isinstance(timestamp, str) else timestamp.isoformat()
    return json.dumps(
        {"business_id": "bus_test", "type": event_type, "timestamp": ts, "data": dict(data)}
    )


def wait_until(
    predicate: Callable[[], Any], *, timeout: float = 30.0, interval: float = 0.1, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception as exc:  # the thing waited for may not answer yet
            last_exc = exc
            value = None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}: {last_exc}")


class ManagedProcess:
    """A child process with its output in a log file, shown when a test fails."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            argv,
            # The checkout under test, even when the venv's editable install points elsewhere.
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

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=timeout)
            except ProcessLookupError:
                pass
        self._log.close()


def service_env(database_url: str, redis_url: str, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "DODO_PAYMENTS_WEBHOOK_KEY": f"{SECRET} {OLD_SECRET}",
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


@contextmanager
def gunicorn(env: Mapping[str, str], log_dir: Path, *, workers: int = 2) -> Iterator[str]:
    """`gunicorn "ingest:create_app()"` as a user runs it; yields its base URL."""
    port = free_port()
    proc = ManagedProcess(
        f"gunicorn-{port}",
        [
            str(VENV_BIN / "gunicorn"),
            "-b",
            f"127.0.0.1:{port}",
            "-w",
            str(workers),
            "ingest:create_app()",
        ],
        env,
        log_dir,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: requests.get(f"{url}/healthz", timeout=1).ok,
            timeout=30,
            what=f"gunicorn to answer; log:\n{proc.output()}",
        )
        yield url
    finally:
        proc.stop()


@contextmanager
def celery_worker(
    env: Mapping[str, str],
    log_dir: Path,
    *,
    name: str = "w1",
    concurrency: int = 2,
    extra: list[str] | None = None,
    command: list[str] | None = None,
) -> Iterator[ManagedProcess]:
    """`celery -A workers worker` as a user runs it (prefork pool), or `command` instead of
    `celery -A workers worker` with the same options."""
    proc = ManagedProcess(
        f"worker-{name}",
        [
            *(command or [str(VENV_BIN / "celery"), "-A", "workers", "worker"]),
            "-n",
            f"{name}@%h",
            "-c",
            str(concurrency),
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
            *(extra or []),
        ],
        env,
        log_dir,
    )
    try:
        wait_until(
            lambda: "ready." in proc.output(),
            timeout=60,
            what=f"celery worker to be ready; log:\n{proc.output()}",
        )
        yield proc
    finally:
        proc.stop()


# ---------------------------------------------------------------- how a body is framed

FRAMINGS = ("content-length", "chunked")


def deliver(
    client: FlaskClient, body: str | bytes, headers: dict[str, str], framing: str
) -> TestResponse:
    """POST the body with a Content-Length, or chunked as gunicorn hands it to the app: no
    length, a stream the server ends itself (`wsgi.input_terminated`)."""
    data = body.encode() if isinstance(body, str) else body
    if framing == "content-length":
        return client.post("/webhooks/dodo", data=data, headers=headers)
    return client.post(
        "/webhooks/dodo",
        input_stream=io.BytesIO(data),
        headers={**headers, "Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )


def body_of_length(length: int, *, payment_id: str = "pay_size") -> str:
    """A valid event envelope padded to exactly `length` bytes."""
    bare = envelope(
        "payment.succeeded", {"payment_id": payment_id, "pad": ""}, timestamp="2026-01-01T00:00:00Z"
    )
    return bare.replace('"pad": ""', '"pad": "' + "x" * (length - len(bare)) + '"')


OUT_SECRET = "whsec_c2VjcmV0LWZvci10aGUtbWVyY2hhbnRzLWFwcA=="


class Receiver:
    """`tests/receiver.py` on a port of its own; stopped and started again on the same one."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hooks"
        self.log_dir = log_dir
        self.log = log_dir / "received.jsonl"
        self.log.touch()
        self.proc: ManagedProcess | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.proc = ManagedProcess(
            f"receiver-{self.starts}",
            [sys.executable, "-m", "tests.receiver", str(self.port), OUT_SECRET, str(self.log)],
            {},
            self.log_dir,
        )
        wait_until(lambda: self.set_mode("ok"), timeout=15, what="the receiver to listen")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def set_mode(self, mode: str) -> bool:
        return requests.post(f"http://127.0.0.1:{self.port}/_mode", data=mode, timeout=2).ok

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]


def stored_event(engine: Engine, webhook_id: str) -> WebhookEvent:
    """The event as recorded, with its body and headers wherever they are kept (its row or
    its day's partition, shared/bodies.py), as the product's readers see it."""
    with Session(engine, expire_on_commit=False) as session:
        event = session.get(WebhookEvent, webhook_id)
        assert event is not None, webhook_id
        fill(session, [event])
        session.expunge(event)
        return event
