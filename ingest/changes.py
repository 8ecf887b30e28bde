"""The change feed on the admin API: the pull route and the outbound deliveries."""

from __future__ import annotations

import contextlib
from typing import Any

from flask import Blueprint, Response, jsonify, request
from sqlalchemy.orm import Session

from ingest.auth import require_admin
from ingest.records import not_found
from ingest.state import state
from shared import changes
from shared.changes import FeedError
from shared.models import OutboundDelivery
from shared.queue import enqueue_deliveries

bp = Blueprint("changes", __name__, url_prefix="/api/changes")
bp.before_request(require_admin)


def bad_request(exc: FeedError) -> tuple[Response, int]:
    return jsonify(error=str(exc)), 400


@bp.get("")
def list_changes() -> tuple[Response, int]:
    """`{"changes": [...], "next_after": <seq>}`, oldest first (see shared/changes.py)."""
    args = request.args
    try:
        after = changes.parse_int(args.get("after"), "after", default=0, low=0, high=2**63 - 1)
        limit = changes.parse_int(
            args.get("limit"), "limit", default=changes.DEFAULT_LIMIT, low=1, high=changes.MAX_LIMIT
        )
        with Session(state().engine) as session:
            page, next_after = changes.list_changes(
                session,
                after=after,
                limit=limit,
                kind=args.get("kind") or None,
                entity_id=args.get("entity_id") or None,
            )
    except FeedError as exc:
        return bad_request(exc)
    return jsonify(changes=page, next_after=next_after), 200


@bp.get("/<change_id>")
def get_change(change_id: str) -> tuple[Response, int]:
    with Session(state().engine) as session:
        change = changes.get_change(session, change_id)
        if change is None:
            return not_found("change", change_id)
        return jsonify(changes.change_view(change)), 200


@bp.get("/deliveries")
def list_deliveries() -> tuple[Response, int]:
    args = request.args
    change_ids = [i for value in args.getlist("change_id") for i in value.split(",") if i]
    try:
        limit = changes.parse_int(
            args.get("limit"), "limit", default=changes.DEFAULT_LIMIT, low=1, high=changes.MAX_LIMIT
        )
        with Session(state().engine) as session:
            rows = changes.list_deliveries(
                session,
                limit=limit,
                status=args.get("status") or None,
                url=args.get("url") or None,
                since=args.get("since") or None,
                change_ids=change_ids or None,
            )
            return jsonify(deliveries=[changes.delivery_view(row) for row in rows]), 200
    except FeedError as exc:
        return bad_request(exc)


@bp.get("/deliveries/<int:delivery_id>")
def get_delivery(delivery_id: int) -> tuple[Response, int]:
    with Session(state().engine) as session:
        row = session.get(OutboundDelivery, delivery_id)
        if row is None:
            return not_found("delivery", str(delivery_id))
        return jsonify(changes.delivery_detail(session, row)), 200


@bp.post("/deliveries/retry")
def retry_deliveries() -> tuple[Response, int]:
    """`{ids?|change_ids?|since?|status?, dry_run?}` → `{matched, requeued}`."""
    body = request.get_json(force=True, silent=True) if request.get_data() else {}
    if not isinstance(body, dict):
        return jsonify(error='the body must be a JSON object, e.g. {"status": "dead"}'), 400
    unknown = sorted(set(body) - {"ids", "change_ids", "since", "status", "dry_run"})
    if unknown:
        return jsonify(error=f"unknown field(s): {', '.join(unknown)}"), 400
    dry_run = body.get("dry_run", False)
    if not isinstance(dry_run, bool):
        return jsonify(error="dry_run must be true or false"), 400
    filters: dict[str, Any] = {k: body.get(k) for k in ("ids", "change_ids", "since", "status")}
    if filters["ids"] is not None and not (
        isinstance(filters["ids"], list) and all(isinstance(i, int) for i in filters["ids"])
    ):
        return jsonify(error="ids must be a list of delivery ids (integers)"), 400
    ingest = state()
    try:
        with Session(ingest.engine) as session, session.begin():
            result = changes.requeue_deliveries(session, dry_run=dry_run, **filters)
    except FeedError as exc:
        return bad_request(exc)
    if result.requeued:
        # If Redis is away they are pending in the database all the same: beat re-drives them.
        with contextlib.suppress(Exception):
            enqueue_deliveries(ingest.celery, result.requeued, retry=False)
    return jsonify(matched=result.matched, requeued=len(result.requeued), dry_run=dry_run), 200
