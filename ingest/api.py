"""The admin API for events and dead letters under /api, behind the admin token."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request
from sqlalchemy.orm import Session, sessionmaker

from ingest.auth import require_admin
from ingest.records import not_found
from ingest.state import state
from shared import deadletters, lifecycle
from shared.bodies import fill
from shared.deadletters import FilterError
from shared.lifecycle import ErasureError
from shared.models import EventStatus, WebhookEvent

bp = Blueprint("api", __name__, url_prefix="/api")


bp.before_request(require_admin)


@bp.get("/events/<webhook_id>")
def get_event(webhook_id: str) -> tuple[Response, int]:
    with Session(state().engine) as session:
        event = session.get(WebhookEvent, webhook_id)
        if event is None:
            return not_found("event", webhook_id)
        return jsonify(event.summary()), 200


def bad_request(exc: FilterError) -> tuple[Response, int]:
    return jsonify(error=str(exc)), 400


@bp.get("/dead-letters")
def list_dead_letters() -> tuple[Response, int]:
    """Dead events, newest received first; `X-Total-Count` holds how many match in all."""
    args = request.args
    ids = [i for value in args.getlist("ids") for i in value.split(",") if i] or None
    filters: dict[str, Any] = {
        "type_glob": args.get("type"),
        "since": args.get("since"),
        "until": args.get("until"),
        "ids": ids,
    }
    try:
        limit = deadletters.parse_limit(args.get("limit"))
        with Session(state().engine) as session:
            events = deadletters.list_dead(session, limit=limit, **filters)
            total = deadletters.count_dead(session, **filters)
    except FilterError as exc:
        return bad_request(exc)
    answer = jsonify([event.summary() for event in events])
    answer.headers["X-Total-Count"] = str(total)
    return answer, 200


@bp.get("/dead-letters/<webhook_id>")
def get_dead_letter(webhook_id: str) -> tuple[Response, int]:
    """One dead event in full: its summary, the signed headers and the raw body."""
    with Session(state().engine) as session:
        event = session.get(WebhookEvent, webhook_id)
        if event is None or event.status != EventStatus.DEAD:
            return not_found("dead letter", webhook_id)
        fill(session, [event])
        return jsonify(event.detail()), 200


@bp.post("/dead-letters/retry")
def retry_dead_letters() -> tuple[Response, int]:
    """Put matching dead events back to `pending` and queue them: `{matched, requeued}`."""
    # Whatever the Content-Type, so `curl -d '{"type": "payment.*"}'` works as typed.
    body = request.get_json(force=True, silent=True) if request.get_data() else {}
    if not isinstance(body, dict):
        return jsonify(error='the body must be a JSON object, e.g. {"type": "payment.*"}'), 400
    unknown = sorted(set(body) - {"ids", "type", "since", "until", "dry_run", "all"})
    if unknown:
        return jsonify(error=f"unknown field(s): {', '.join(unknown)}"), 400
    dry_run, everything = body.get("dry_run", False), body.get("all", False)
    if not isinstance(dry_run, bool) or not isinstance(everything, bool):
        return jsonify(error="dry_run and all must be true or false"), 400
    ingest = state()
    try:
        with Session(ingest.engine) as session, session.begin():
            result = deadletters.requeue_dead(
                session,
                type_glob=body.get("type"),
                since=body.get("since"),
                until=body.get("until"),
                ids=body.get("ids"),
                everything=everything,
                dry_run=dry_run,
            )
    except FilterError as exc:
        return bad_request(exc)
    # After the commit: a worker that picks the message up must find the event pending.
    sent = None
    if not dry_run:
        sent = deadletters.enqueue_requeued(ingest.celery, result.requeued, ping=ingest.redis.ping)
    answer: dict[str, Any] = {
        "matched": result.matched,
        "requeued": len(result.requeued),
        "queued": sent.queued if sent else 0,
        "dry_run": dry_run,
    }
    notes = deadletters.requeue_notes(
        result, sent, redrive_after_seconds=ingest.settings.redrive_after_seconds
    )
    if notes:
        answer["notes"] = notes
    return jsonify(answer), 200


@bp.post("/customers/<customer_id>/erase")
def erase_customer(customer_id: str) -> tuple[Response, int]:
    """Erase the customer's personal data (as `dodo-webhooks erase-customer`); `{"dry_run":
    true}` counts what would change. Answers the counts per table."""
    body = request.get_json(force=True, silent=True) if request.get_data() else {}
    if not isinstance(body, dict):
        return jsonify(error='the body must be a JSON object, e.g. {"dry_run": true}'), 400
    unknown = sorted(set(body) - {"dry_run"})
    if unknown:
        return jsonify(error=f"unknown field(s): {', '.join(unknown)}"), 400
    dry_run = body.get("dry_run", False)
    if not isinstance(dry_run, bool):
        return jsonify(error="dry_run must be true or false"), 400
    factory = sessionmaker(bind=state().engine, expire_on_commit=False)
    try:
        result = lifecycle.erase_customer(
            factory, customer_id, dry_run=dry_run, requested_by=f"api:{request.remote_addr}"
        )
    except ErasureError as exc:
        return jsonify(error=str(exc)), 400
    return jsonify(result.as_json()), 200
