"""The ingest floor: a bare Flask app that only verifies the signature and LPUSHes the body.

What any webhook receiver on this stack must do at the least; the real ingest's rate is
reported as a ratio of this one's, measured in the same run under the same gunicorn flags:

    gunicorn "bench.floor_app:create_app()"   (DODO_PAYMENTS_WEBHOOK_KEY, REDIS_URL)
"""

from __future__ import annotations

import os

import redis
from flask import Flask, Response, jsonify, request
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

QUEUE = "bench:floor"


def create_app() -> Flask:
    webhook = Webhook(os.environ["DODO_PAYMENTS_WEBHOOK_KEY"].split()[0])
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    app = Flask("floor")

    @app.get("/healthz")
    def healthz() -> tuple[Response, int]:
        return jsonify(status="ok"), 200

    @app.post("/webhooks/dodo")
    def receive() -> tuple[Response, int]:
        body = request.get_data(cache=False)
        try:
            webhook.verify(body, dict(request.headers.items(lower=True)), json_parse=False)
        except (WebhookVerificationError, ValueError):
            return jsonify(error="bad signature"), 401
        client.lpush(QUEUE, body)
        return jsonify(status="queued", webhook_id=request.headers["webhook-id"]), 202

    return app
