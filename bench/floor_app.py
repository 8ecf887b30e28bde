"""The ingest floor: a bare Flask app that only verifies the signature and LPUSHes the body.

What any webhook receiver on this stack must do at the least; the real ingest's rate is
reported as a ratio of this one's, measured in the same run under the same gunicorn flags:

    gunicorn "bench.floor_app:create_app()"   (DODO_PAYMENTS_WEBHOOK_KEY, REDIS_URL)

Beside it, for reference, the durable floor: the same plus the one thing the ingest promises
that the floor does not, the delivery written to PostgreSQL before the answer (one INSERT
in autocommit, the plain psycopg way). The ingest's rate against this one is what its own
code costs; the durable floor's against the floor is what the promise costs on the machine:

    gunicorn "bench.floor_app:create_durable_app()"   (... and DATABASE_URL)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import redis
from flask import Flask, Response, jsonify, request
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

QUEUE = "bench:floor"
SIGNED = ("webhook-id", "webhook-timestamp", "webhook-signature")
INSERT = (
    "INSERT INTO webhook_events (webhook_id, status, attempts, body, headers, webhook_ts, "
    "received_at) VALUES (%s, 'pending', 0, %s, %s, %s, now()) "
    "ON CONFLICT (webhook_id) DO NOTHING RETURNING webhook_id"
)


def create_app() -> Flask:
    return _floor("floor")


def create_durable_app() -> Flask:
    # Imported here: the plain floor's workers (and their peak RSS) do without them.
    import psycopg
    from psycopg.types.json import Json
    from sqlalchemy.engine import make_url

    url = make_url(os.environ["DATABASE_URL"]).set(drivername="postgresql")
    dsn = url.render_as_string(hide_password=False)
    held: list[psycopg.Connection[Any]] = []  # this worker's connection, opened on first use

    def record(body: bytes, headers: dict[str, str]) -> None:
        if not held:
            held.append(psycopg.connect(dsn, autocommit=True))
        signed = {name: headers[name] for name in SIGNED}
        params = (signed["webhook-id"], body, Json(signed), int(signed["webhook-timestamp"]))
        held[0].execute(INSERT, params, prepare=True)

    return _floor("durable_floor", record)


def _floor(name: str, record: Callable[[bytes, dict[str, str]], None] | None = None) -> Flask:
    webhook = Webhook(os.environ["DODO_PAYMENTS_WEBHOOK_KEY"].split()[0])
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    app = Flask(name)

    @app.get("/healthz")
    def healthz() -> tuple[Response, int]:
        return jsonify(status="ok"), 200

    @app.post("/webhooks/dodo")
    def receive() -> tuple[Response, int]:
        body = request.get_data(cache=False)
        headers = dict(request.headers.items(lower=True))
        try:
            webhook.verify(body, headers, json_parse=False)
        except (WebhookVerificationError, ValueError):
            return jsonify(error="bad signature"), 401
        if record is not None:
            record(body, headers)
        client.lpush(QUEUE, body)
        return jsonify(status="queued", webhook_id=headers["webhook-id"]), 202

    return app
