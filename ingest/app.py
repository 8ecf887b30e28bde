"""The Flask application factory: `gunicorn "ingest:create_app()"`."""

from __future__ import annotations

import sys
from typing import NoReturn

import redis
from flask import Flask, Response, jsonify, request
from sqlalchemy import Engine, text
from werkzeug.exceptions import HTTPException

from ingest import api, changes, health, records, webhooks
from ingest.console import init_console
from ingest.metrics import ingest_metrics
from ingest.publisher import QueueSignal
from ingest.recording import Recorder
from ingest.state import IngestState
from ingest.verify import Verifier
from shared.db import make_engine
from shared.logs import configure_logging, get_logger
from shared.queue import make_celery
from shared.settings import ConfigError, Settings, first_line, get_settings, redact_url

log = get_logger("ingest")


# gunicorn's "application failed to load": the master stops instead of respawning workers.
APP_LOAD_ERROR = 4


def create_app(settings: Settings | None = None, *, check_connections: bool = True) -> Flask:
    """The ingest. With `check_connections`, an unreachable database or Redis stops the start."""
    try:
        settings = settings or get_settings()
        secrets, engine, redis_client = connect(settings, check_connections=check_connections)
    except ConfigError as exc:
        exit_with(exc)
    configure_logging(settings.log_level)

    celery = make_celery(settings)
    app = Flask("ingest")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["dodo"] = IngestState(
        settings=settings,
        engine=engine,
        recorder=Recorder(engine),
        celery=celery,
        signal=QueueSignal(celery, redis_client),
        verifier=Verifier(secrets),
        metrics=ingest_metrics(),
        redis=redis_client,
    )

    for blueprint in (webhooks.bp, health.bp, api.bp, records.bp, changes.bp):
        app.register_blueprint(blueprint)
    init_console(app, settings)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    return app


def connect(
    settings: Settings, *, check_connections: bool
) -> tuple[list[str], Engine, redis.Redis]:
    """The secrets, the engine and the Redis client, or a ConfigError naming the variable."""
    secrets = settings.require_webhook_key()
    # Deliveries go through the Recorder's own connection; this pool serves the API, the
    # metrics and the health checks, which can afford a ping on checkout.
    engine = make_engine(settings.database_url)
    redis_client = redis.Redis.from_url(
        settings.redis_url, socket_timeout=2, socket_connect_timeout=2
    )
    if check_connections:
        try:
            check_reachable(engine, redis_client, settings)
        except ConfigError:
            engine.dispose()
            redis_client.close()
            raise
    return secrets, engine, redis_client


def exit_with(exc: ConfigError) -> NoReturn:
    # Under gunicorn a traceback here would bury the one line the operator needs.
    print(f"dodo-webhooks ingest: {exc}", file=sys.stderr)
    raise SystemExit(APP_LOAD_ERROR) from None


def preflight() -> None:
    """create_app's checks, run once by gunicorn's master (gunicorn.conf.py) before any worker
    boots: when several workers fail to load at once, gunicorn's arbiter ends with a traceback
    of its own after our line."""
    try:
        _, engine, redis_client = connect(get_settings(), check_connections=True)
    except ConfigError as exc:
        exit_with(exc)
    engine.dispose()
    redis_client.close()


def check_reachable(engine: Engine, redis_client: redis.Redis, settings: Settings) -> None:
    """Fail fast at start, naming the variable, rather than answer 503 to everything."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        raise ConfigError(
            f"DATABASE_URL: cannot connect to {redact_url(settings.database_url)}: "
            f"{first_line(exc)}"
        ) from None
    try:
        redis_client.ping()
    except Exception as exc:
        raise ConfigError(
            f"REDIS_URL: cannot connect to {redact_url(settings.redis_url)}: {first_line(exc)}"
        ) from None


def _http_error(exc: HTTPException) -> tuple[Response, int]:
    return jsonify(error=exc.description or exc.name), exc.code or 500


def _unexpected_error(exc: Exception) -> tuple[Response, int]:
    # Never a 500: the sender retries a 503, and nothing was acknowledged.
    log.error("unexpected error", exc_info=exc, extra={"path": request.path})
    return jsonify(error="temporarily unavailable"), 503
