"""The admin API under /api, behind `Authorization: Bearer $ADMIN_TOKEN`."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from flask import Blueprint, Response, jsonify, request
from sqlalchemy import select
from sqlalchemy.orm import Session

from ingest.app import require_admin, state
from shared import deadletters
from shared.deadletters import FilterError
from shared.models import (
    Dispute,
    DisputeHistory,
    EventStatus,
    LicenseKey,
    Payment,
    Refund,
    SnapshotMixin,
    Subscription,
    SubscriptionHistory,
    WebhookEvent,
    isoformat,
)

bp = Blueprint("api", __name__, url_prefix="/api")


@bp.before_request
def _authenticate() -> tuple[Response, int] | None:
    return require_admin()


def not_found(what: str, key: str) -> tuple[Response, int]:
    return jsonify(error=f"{what} {key!r} not found"), 404


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


def snapshot_view(row: SnapshotMixin, columns: dict[str, Any]) -> dict[str, Any]:
    """Dodo's object as last delivered, overlaid with our columns, and the event it came from."""
    view: dict[str, Any] = dict(row.data)
    for name, value in columns.items():
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, Decimal):
            value = str(value)
        view[name] = value
    view["last_event"] = {
        "type": row.last_event_type,
        "timestamp": isoformat(row.last_event_at),
        "webhook_id": row.last_webhook_id,
    }
    return view


@bp.get("/payments/<payment_id>")
def get_payment(payment_id: str) -> tuple[Response, int]:
    with Session(state().engine) as session:
        row = session.get(Payment, payment_id)
        if row is None:
            return not_found("payment", payment_id)
        columns = {
            "payment_id": row.payment_id,
            "status": row.status,
            "total_amount": row.total_amount,
            "currency": row.currency,
            "customer_id": row.customer_id,
            "subscription_id": row.subscription_id,
            "refund_status": row.refund_status,
        }
        return jsonify(snapshot_view(row, columns)), 200


@bp.get("/refunds/<refund_id>")
def get_refund(refund_id: str) -> tuple[Response, int]:
    with Session(state().engine) as session:
        row = session.get(Refund, refund_id)
        if row is None:
            return not_found("refund", refund_id)
        columns = {
            "refund_id": row.refund_id,
            "payment_id": row.payment_id,
            "status": row.status,
            "amount": row.amount,
            "currency": row.currency,
        }
        return jsonify(snapshot_view(row, columns)), 200


@bp.get("/disputes/<dispute_id>")
def get_dispute(dispute_id: str) -> tuple[Response, int]:
    with Session(state().engine) as session:
        row = session.get(Dispute, dispute_id)
        if row is None:
            return not_found("dispute", dispute_id)
        history = session.scalars(
            select(DisputeHistory)
            .where(DisputeHistory.dispute_id == dispute_id)
            .order_by(DisputeHistory.event_at, DisputeHistory.webhook_ts, DisputeHistory.webhook_id)
        )
        columns = {
            "dispute_id": row.dispute_id,
            "payment_id": row.payment_id,
            "dispute_status": row.dispute_status,
            "dispute_stage": row.dispute_stage,
            "amount": row.amount,
            "currency": row.currency,
        }
        view = snapshot_view(row, columns)
        view["history"] = [
            {
                "dispute_status": step.dispute_status,
                "dispute_stage": step.dispute_stage,
                "type": step.type,
                "timestamp": isoformat(step.event_at),
                "webhook_id": step.webhook_id,
            }
            for step in history
        ]
        return jsonify(view), 200


@bp.get("/subscriptions/<subscription_id>")
def get_subscription(subscription_id: str) -> tuple[Response, int]:
    with Session(state().engine) as session:
        row = session.get(Subscription, subscription_id)
        if row is None:
            return not_found("subscription", subscription_id)
        history = session.scalars(
            select(SubscriptionHistory)
            .where(SubscriptionHistory.subscription_id == subscription_id)
            .order_by(
                SubscriptionHistory.event_at,
                SubscriptionHistory.webhook_ts,
                SubscriptionHistory.webhook_id,
            )
        )
        columns = {
            "subscription_id": row.subscription_id,
            "status": row.status,
            "product_id": row.product_id,
            "quantity": row.quantity,
            "customer_id": row.customer_id,
            "next_billing_date": row.next_billing_date,
            "previous_billing_date": row.previous_billing_date,
            "cancel_at_next_billing_date": row.cancel_at_next_billing_date,
            "cancelled_at": row.cancelled_at,
        }
        view = snapshot_view(row, columns)
        view["history"] = [
            {
                "status": step.status,
                "product_id": step.product_id,
                "quantity": step.quantity,
                "type": step.type,
                "timestamp": isoformat(step.event_at),
                "webhook_id": step.webhook_id,
            }
            for step in history
        ]
        return jsonify(view), 200


@bp.get("/license-keys/<license_key_id>")
def get_license_key(license_key_id: str) -> tuple[Response, int]:
    with Session(state().engine) as session:
        row = session.get(LicenseKey, license_key_id)
        if row is None:
            return not_found("license key", license_key_id)
        columns = {
            "id": row.id,
            "key": row.key,
            "status": row.status,
            "customer_id": row.customer_id,
            "product_id": row.product_id,
            "expires_at": row.expires_at,
        }
        return jsonify(snapshot_view(row, columns)), 200


from ingest import credits_api  # noqa: E402, F401  (adds the credit routes to `bp`)
