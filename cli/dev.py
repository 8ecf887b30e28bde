"""`dodo-webhooks dev`: the whole pipeline on one machine — embedded broker, SQLite, children."""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TextIO

from cli.errors import CommandError
from shared.settings import parse_secrets, parse_urls

# The settings file `dodo-webhooks dev` writes and `send-test` reads back.
DEV_ENV_FILE = "dev.env"
DEFAULT_DATA_DIR = "dev-data"
# gunicorn workers of the dev ingest.
INGEST_WORKERS = 2
# The directory holding `shared/`, `ingest/` and `workers/`: the children import this code.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class DevError(Exception):
    """Something that stops the dev server, explained in one line."""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dev = commands.add_parser(
        "dev",
        help="run the whole pipeline locally (embedded broker, SQLite)",
        description=(
            "Run ingest, a Celery worker and beat on this machine with an embedded "
            "Redis-compatible broker (fakeredis) and SQLite; nothing else to install."
        ),
    )
    dev.add_argument("--port", type=int, default=8000, help="ingest port (default 8000)")
    dev.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        help=f"database, secrets and logs (default ./{DEFAULT_DATA_DIR})",
    )
    dev.add_argument(
        "--broker-port", type=int, default=0, help="embedded broker port (default: a free one)"
    )
    dev.add_argument(
        "--concurrency", type=int, default=2, help="Celery worker processes (default 2)"
    )
    dev.add_argument(
        "--verbose", "-v", action="store_true", help="print every line the children log"
    )
    dev.add_argument(
        "--forward-to",
        action="append",
        default=[],
        metavar="URL",
        help="POST every change of the read model to this local app, signed as Standard "
        "Webhooks (like `stripe listen --forward-to`); repeat for several",
    )
    dev.set_defaults(run=cmd_dev)


def cmd_dev(args: argparse.Namespace) -> int:

    try:
        return run_dev(
            port=args.port,
            data_dir=Path(args.data_dir),
            broker_port=args.broker_port,
            concurrency=args.concurrency,
            verbose=args.verbose,
            forward_to=tuple(args.forward_to),
        )
    except DevError as exc:
        raise CommandError(str(exc)) from None


# ---------------------------------------------------------------- settings kept in the data dir


def read_env_file(path: Path) -> dict[str, str]:
    """`KEY=value` lines; blank lines and `#` comments skipped. Missing file: {}."""
    values: dict[str, str] = {}
    try:
        text = path.read_text()
    except FileNotFoundError:
        return values
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip()
    return values


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


@dataclass(frozen=True)
class DevSettings:
    """What the children are given, and what `send-test` reads back from `dev.env`."""

    data_dir: Path
    port: int
    broker_port: int
    webhook_key: str
    admin_token: str
    secret_from_env: bool
    token_from_env: bool = False
    # The console's one-click sign-in for this run: a new one-time token at each start.
    console_login: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    # `--forward-to`: where the changes go, and the secret they are signed with.
    forward_to: tuple[str, ...] = ()
    outbound_secret: str = ""

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.data_dir / 'dodo-webhooks.db'}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.broker_port}/0"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def webhook_url(self) -> str:
        return f"{self.base_url}/webhooks/dodo"

    def child_env(self) -> dict[str, str]:
        env = {
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "DODO_PAYMENTS_WEBHOOK_KEY": self.webhook_key,
            "ADMIN_TOKEN": self.admin_token,
            "CONSOLE_LOGIN_TOKEN": self.console_login,
        }
        if self.forward_to:
            env["OUTBOUND_WEBHOOK_URL"] = " ".join(self.forward_to)
            env["OUTBOUND_WEBHOOK_SECRET"] = self.outbound_secret
        return env

    def write(self) -> Path:
        path = self.data_dir / DEV_ENV_FILE
        lines = [
            "# Written by `dodo-webhooks dev`; `dodo-webhooks send-test` reads it.",
            "# The secret and token are generated once and kept across runs.",
            f"DODO_WEBHOOKS_URL={self.webhook_url}",
            f"DATABASE_URL={self.database_url}",
            f"REDIS_URL={self.redis_url}",
        ]
        if self.token_from_env:
            lines.append("# ADMIN_TOKEN came from the environment; not stored.")
        else:
            lines.append(f"ADMIN_TOKEN={self.admin_token}")
        if self.secret_from_env:
            lines.append("# DODO_PAYMENTS_WEBHOOK_KEY came from the environment; not stored.")
        else:
            lines.append(f"DODO_PAYMENTS_WEBHOOK_KEY={self.webhook_key}")
        if self.outbound_secret:
            lines.append("# The secret `--forward-to` signs the changes with (your app verifies).")
            lines.append(f"OUTBOUND_WEBHOOK_SECRET={self.outbound_secret}")
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o600)
        return path

    def secrets_from_env(self) -> list[str]:
        """What the user gave us: never printed or logged in full (a generated one is)."""
        given = parse_secrets(self.webhook_key) if self.secret_from_env else []
        return given + ([self.admin_token] if self.token_from_env else [])


def dev_settings(
    data_dir: Path, port: int, broker_port: int, forward_to: tuple[str, ...] = ()
) -> DevSettings:
    """The secret and token: from the environment if set, else the ones kept in the data dir."""
    kept = read_env_file(data_dir / DEV_ENV_FILE)
    given_key = os.environ.get("DODO_PAYMENTS_WEBHOOK_KEY", "").strip()
    if given_key:
        try:
            parse_secrets(given_key)
        except ValueError as exc:
            raise DevError(f"DODO_PAYMENTS_WEBHOOK_KEY: {exc}") from None
    webhook_key = given_key or kept.get("DODO_PAYMENTS_WEBHOOK_KEY") or new_secret()
    given_token = os.environ.get("ADMIN_TOKEN", "").strip()
    admin_token = given_token or kept.get("ADMIN_TOKEN") or secrets.token_urlsafe(24)
    outbound_secret = ""
    if forward_to:
        try:
            parse_urls(list(forward_to))
        except ValueError as exc:
            raise DevError(f"--forward-to: {exc}") from None
        given_out = os.environ.get("OUTBOUND_WEBHOOK_SECRET", "").strip()
        try:
            parse_secrets(given_out)
        except ValueError as exc:
            raise DevError(f"OUTBOUND_WEBHOOK_SECRET: {exc}") from None
        outbound_secret = given_out or kept.get("OUTBOUND_WEBHOOK_SECRET") or new_secret()
    return DevSettings(
        data_dir=data_dir,
        port=port,
        broker_port=broker_port,
        webhook_key=webhook_key,
        admin_token=admin_token,
        secret_from_env=bool(given_key),
        token_from_env=bool(given_token),
        forward_to=forward_to,
        outbound_secret=outbound_secret,
    )


def mask(secret: str) -> str:
    """Enough to tell which secret it is, not enough to use it: `whsec_…LaSw`."""
    prefix = "whsec_" if secret.startswith("whsec_") else ""
    rest = secret.removeprefix(prefix)
    return f"{prefix}…{rest[-4:]}" if len(rest) >= 16 else f"{prefix}…"


def masker(hidden: list[str]) -> Callable[[bytes], bytes]:
    """Replace each of `hidden` by its mask in a line of a child's output."""
    # A whsec_ secret's key part alone is as good as the secret. Shorter than 8 characters a
    # string would be replaced wherever it occurs (a token `dev` in `dev@host ready.`).
    forms = {form for h in hidden for form in (h, h.removeprefix("whsec_")) if len(form) >= 8}
    pairs = [(f.encode(), mask(f).encode()) for f in sorted(forms, key=len, reverse=True)]

    def redact(raw: bytes) -> bytes:
        for secret, masked in pairs:
            raw = raw.replace(secret, masked)
        return raw

    return redact


# ---------------------------------------------------------------- the embedded broker


def check_port_free(port: int, what: str, option: str) -> None:
    with socket.socket() as sock:
        # As gunicorn binds: connections of a previous run left in TIME_WAIT do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            raise DevError(
                f"port {port} on 127.0.0.1 is already in use ({what}): "
                f"stop what is listening there or pass {option} <another port>"
            ) from None


class EmbeddedBroker:
    """fakeredis's Redis-compatible TCP server (with Lua, which kombu needs) in a thread."""

    def __init__(self, port: int) -> None:
        from fakeredis import TcpFakeServer

        try:
            self._server = TcpFakeServer(("127.0.0.1", port))
        except OSError:
            raise DevError(
                f"port {port} on 127.0.0.1 is already in use (embedded broker): "
                "pass --broker-port <another port>, or omit it for a free one"
            ) from None
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fakeredis", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()  # waits for serve_forever: only once it runs
        self._server.server_close()


# ---------------------------------------------------------------- the children


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            self.argv,
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Its own process group: Ctrl-C reaches only us, and we stop each child in order.
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    def show_output(
        self, echo: Callable[[str, str], None], redact: Callable[[bytes], bytes] = bytes
    ) -> threading.Thread:
        """Each line of the child's output, `redact`ed, to its log file and to `echo`."""
        assert self.proc is not None
        pump = threading.Thread(
            target=self._pump,
            args=(self.proc.stdout, echo, redact),
            name=f"log-{self.name}",
            daemon=True,
        )
        pump.start()
        return pump

    def _pump(
        self,
        stream: IO[bytes] | None,
        echo: Callable[[str, str], None],
        redact: Callable[[bytes], bytes],
    ) -> None:
        assert stream is not None
        with stream, self.log_path.open("ab") as log:
            for line in iter(stream.readline, b""):
                raw = redact(line)
                log.write(raw)
                log.flush()
                echo(self.name, raw.decode(errors="replace").rstrip())

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, timeout: float) -> None:
        """SIGTERM to the leader, which stops its own workers or pool; then SIGKILL the group."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                self.proc.wait(timeout=timeout)
        # Whatever of the group outlived its leader (an orphaned pool child) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when `dev` dies, even by SIGKILL (Linux only).

    Children are started before any thread of ours exists, so running code between fork and
    exec is safe here.
    """
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


def children(settings: DevSettings, concurrency: int) -> list[Child]:
    py = sys.executable
    logs = settings.data_dir / "logs"
    # The children run in the data dir: no gunicorn.conf.py or celerybeat-schedule is picked
    # up from, or left in, the directory the user typed the command in.
    return [
        Child(
            "ingest",
            [
                py,
                "-m",
                "gunicorn",
                "--bind",
                f"127.0.0.1:{settings.port}",
                "--workers",
                str(INGEST_WORKERS),
                "--graceful-timeout",
                "5",
                "--access-logfile",
                "-",
                "--access-logformat",
                "%(m)s %(U)s %(s)s %(M)sms",
                "ingest:create_app()",
            ],
            logs / "ingest.log",
        ),
        Child(
            "worker",
            [
                py,
                "-m",
                "celery",
                "-A",
                "workers",
                "worker",
                "--loglevel",
                "INFO",
                "--pool",
                "prefork",
                "--concurrency",
                str(concurrency),
                "--hostname",
                "dev@%h",
                "--without-gossip",
                "--without-mingle",
            ],
            logs / "worker.log",
        ),
        Child(
            "beat",
            [
                py,
                "-m",
                "celery",
                "-A",
                "workers",
                "beat",
                "--loglevel",
                "INFO",
                "--schedule",
                str(settings.data_dir / "celerybeat-schedule"),
            ],
            logs / "beat.log",
        ),
    ]


# ---------------------------------------------------------------- what the terminal shows


class Console:
    """One short line per child log line worth a human's attention; everything in the log files."""

    WIDTH = 7

    def __init__(self, out: TextIO, verbose: bool) -> None:
        self._out = out
        self._verbose = verbose
        self._lock = threading.Lock()
        self.closed = False
        # Called once when the terminal or pipe we print to is gone.
        self.on_closed: Callable[[], None] = lambda: None

    def say(self, text: str) -> None:
        with self._lock:
            if self.closed:
                return
            try:
                print(text, file=self._out, flush=True)
            except BrokenPipeError:
                # `dev | head` and the reader left: stop everything, without a word.
                self.closed = True
                self.on_closed()

    def echo(self, name: str, line: str) -> None:
        shown = line if self._verbose else readable(line)
        if shown:
            self.say(f"{name:<{self.WIDTH}} | {shown}")


_QUIET = (
    "Task workers.",  # celery's own per-task lines; our JSON step lines say more
    "/healthz",
    "Scheduler: Sending due task",
)
_LOUD = ("ERROR", "CRITICAL", "Traceback", "WARNING", "Error:", "error:")


def readable(line: str) -> str:
    """A JSON step line condensed; other lines shown only when they matter."""
    if not line.strip():
        return ""
    if line.startswith("{"):
        try:
            record: dict[str, Any] = json.loads(line)
        except ValueError:
            return line
        step = record.get("step") or record.get("msg", "")
        parts = [f"{step:<10}"]
        for key in ("type", "webhook_id", "attempt", "outcome", "http_status", "count"):
            if record.get(key) is not None:
                parts.append(f"{key}={record[key]}" if key != "type" else str(record[key]))
        for key in ("reason", "error"):
            if record.get(key):
                parts.append(f"{key}: {record[key]}")
        level = record.get("level", "info")
        return ("" if level == "info" else f"{level.upper()} ") + "  ".join(parts)
    if any(marker in line for marker in _QUIET):
        return ""
    if any(marker in line for marker in _LOUD):
        return line
    for marker in ("Listening at", "ready.", "beat: Starting", "Booting worker"):
        if marker in line:
            return line.split("] ")[-1] if "] " in line else line
    if line.startswith(("POST ", "GET ")):
        return line
    return ""


# ---------------------------------------------------------------- the run


def migrate(database_url: str) -> None:
    from cli.db import upgrade

    try:
        upgrade(database_url)
    except Exception as exc:
        raise DevError(f"could not migrate {database_url}: {type(exc).__name__}: {exc}") from None


def wait_for_http(url: str, timeout: float, alive: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


@contextlib.contextmanager
def stop_signals() -> Iterator[threading.Event]:
    """SIGINT, SIGTERM and SIGHUP set the event instead of raising: shutdown runs in one place."""
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        stop.set()

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def banner(settings: DevSettings, env_file: Path, concurrency: int) -> str:
    data_dir = settings.data_dir
    send = "dodo-webhooks send-test payment.succeeded"
    if data_dir.resolve() != Path(DEFAULT_DATA_DIR).resolve():
        send += f" --data-dir {data_dir}"
    if settings.secret_from_env:
        send += "   (with DODO_PAYMENTS_WEBHOOK_KEY set there too)"
    if settings.secret_from_env:
        given = parse_secrets(settings.webhook_key)
        secret = " ".join(mask(s) for s in given)
        secret_note = "from DODO_PAYMENTS_WEBHOOK_KEY, masked"
    else:
        secret, secret_note = settings.webhook_key, f"test secret, kept in {env_file}"
    if settings.token_from_env:
        shown_token, token_note, token = (
            mask(settings.admin_token),
            "  (from ADMIN_TOKEN, masked)",
            "$ADMIN_TOKEN",
        )
    else:
        shown_token = token = settings.admin_token
        token_note = ""
    pool = f"{concurrency} process{'es' if concurrency != 1 else ''}"
    return "\n".join(
        [
            "",
            "dodo-webhooks dev is running",
            f"  processes     ingest (gunicorn, {INGEST_WORKERS} workers), Celery worker "
            f"({pool}, --concurrency {concurrency}), beat",
            f"  webhook URL   {settings.webhook_url}",
            f"  secret        {secret}  ({secret_note})",
            f"  admin token   {shown_token}{token_note}",
            f"  database      {settings.database_url}",
            f"  broker        {settings.redis_url}  (fakeredis, in memory)",
            f"  logs          {data_dir / 'logs'}/",
            *(
                [
                    f"  forwarding    changes to {', '.join(settings.forward_to)}",
                    f"  signed with   {settings.outbound_secret}",
                ]
                if settings.forward_to
                else []
            ),
            "",
            "Send a signed test event from another terminal:",
            f"  {send}",
            "and look at it (the webhook id is in send-test's answer):",
            f'  curl -H "Authorization: Bearer {token}" '
            f"{settings.base_url}/api/events/<webhook_id>",
            f"Console: {settings.base_url}/console/  (sign in once with one click: "
            f"{settings.base_url}/console/login?once={settings.console_login})",
            f"Metrics: {settings.base_url}/metrics    Ctrl-C stops everything.",
            "",
        ]
    )


def run_dev(
    *,
    port: int,
    data_dir: Path,
    broker_port: int,
    concurrency: int,
    verbose: bool,
    out: TextIO = sys.stdout,
    forward_to: tuple[str, ...] = (),
) -> int:
    data_dir = data_dir.expanduser().resolve()
    if sqlite3.sqlite_version_info < (3, 35):
        # The worker claims an event with UPDATE … RETURNING.
        raise DevError(f"dev needs SQLite 3.35 or newer; this Python has {sqlite3.sqlite_version}")
    check_port_free(port, "the ingest", "--port")
    try:
        (data_dir / "logs").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DevError(f"--data-dir {data_dir}: {exc.strerror}") from None
    console = Console(out, verbose)

    broker = EmbeddedBroker(broker_port)
    try:
        settings = dev_settings(data_dir, port, broker.port, forward_to)
    except DevError:
        broker.stop()
        raise
    env_file = settings.write()
    console.say(f"dev: migrating {settings.database_url}")
    try:
        migrate(settings.database_url)
    except DevError:
        broker.stop()
        raise

    metrics_dir = data_dir / "prometheus"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir()
    env = {
        **os.environ,
        **settings.child_env(),
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p
        ),
        "PYTHONUNBUFFERED": "1",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        # The broker forgets its queues when dev stops; events a previous run left pending are
        # re-driven from the database by beat, sooner than production's default.
        "REDRIVE_AFTER_SECONDS": os.environ.get("REDRIVE_AFTER_SECONDS", "10"),
    }
    procs = children(settings, concurrency)
    redact = masker(settings.secrets_from_env())
    code = 0
    with stop_signals() as stop:
        console.on_closed = stop.set
        if console.closed:
            stop.set()
        try:
            # The broker's socket is listening already; its thread and the log readers start
            # once every child is forked (see _die_with_parent).
            for child in procs:
                child.start(env, data_dir)
            for child in procs:
                child.show_output(console.echo, redact)
            broker.start()
            ingest = procs[0]
            if not wait_for_http(
                f"{settings.base_url}/healthz",
                60,
                lambda: ingest.exit_code() is None and not stop.is_set(),
            ):
                if not stop.is_set():
                    raise DevError(
                        f"the ingest did not start; see {ingest.log_path}"
                        + (
                            f" (exit status {ingest.exit_code()})"
                            if ingest.exit_code() is not None
                            else ""
                        )
                    )
            else:
                console.say(banner(settings, env_file, concurrency))
            while not stop.wait(0.5):
                dead = [c for c in procs if c.exit_code() is not None]
                if dead:
                    child = dead[0]
                    console.say(
                        f"dev: {child.name} exited with status {child.exit_code()}; "
                        f"stopping (log: {child.log_path})"
                    )
                    code = 1
                    break
        finally:
            console.say("dev: stopping")
            for child in reversed(procs):
                child.stop(timeout=15)
            broker.stop()
    console.say("dev: stopped")
    if console.closed:
        raise BrokenPipeError  # the command line ends quietly, with the status of `| head`
    return code
