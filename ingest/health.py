"""Liveness, readiness and metrics."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from ingest.metrics import render_metrics
from ingest.state import state

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> tuple[Response, int]:
    return jsonify(status="ok"), 200


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    failed: dict[str, str] = {}
    try:
        with state().engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        failed["database"] = type(exc).__name__
    try:
        state().redis.ping()
    except Exception as exc:
        failed["redis"] = type(exc).__name__
    if failed:
        return jsonify(status="unavailable", failed=failed), 503
    return jsonify(status="ready"), 200


@bp.get("/metrics")
def metrics() -> Response:
    return Response(render_metrics(state().engine), mimetype=CONTENT_TYPE_LATEST)
