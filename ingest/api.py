"""The admin API under /api, behind `Authorization: Bearer $ADMIN_TOKEN`."""

from __future__ import annotations

from datetime import datetime

from flask import Blueprint, Response, jsonify
from sqlalchemy.orm import Session

from ingest.app import require_admin, state
from shared.models import WebhookEvent

bp = Blueprint("api", __name__, url_prefix="/api")


@bp.before_request
def _authenticate() -> tuple[Response, int] | None:
    return require_admin()


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def not_found(what: str, key: str) -> tuple[Response, int]:
    return jsonify(error=f"{what} {key!r} not found"), 404


@bp.get("/events/<webhook_id>")
def get_event(webhook_id: str) -> tuple[Response, int]:
    with Session(state().engine) as session:
        event = session.get(WebhookEvent, webhook_id)
        if event is None:
            return not_found("event", webhook_id)
        return jsonify(event_summary(event)), 200


def event_summary(event: WebhookEvent) -> dict[str, object]:
    return {
        "webhook_id": event.webhook_id,
        "type": event.type,
        "status": event.status,
        "outcome": event.outcome,
        "attempts": event.attempts,
        "last_error": event.last_error,
        "received_at": iso(event.received_at),
        "processed_at": iso(event.processed_at),
    }


from ingest import credits_api  # noqa: E402, F401  (adds the credit routes to `bp`)
