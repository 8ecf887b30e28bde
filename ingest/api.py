"""The admin API under /api, behind `Authorization: Bearer $ADMIN_TOKEN`."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from flask import Blueprint, Response, jsonify
from sqlalchemy import select
from sqlalchemy.orm import Session

from ingest.app import require_admin, state
from shared.models import (
    Dispute,
    DisputeHistory,
    LicenseKey,
    Payment,
    Refund,
    SnapshotMixin,
    Subscription,
    SubscriptionHistory,
    WebhookEvent,
)

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
        "timestamp": iso(row.last_event_at),
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
                "timestamp": iso(step.event_at),
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
                "timestamp": iso(step.event_at),
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
