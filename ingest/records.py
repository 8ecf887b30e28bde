"""The read model on the admin API: each record as Dodo's object, and the credit ledger.

A record's JSON is its model's (`representation`), so a new column shows here by itself.
A customer is known once any record names them (a credit account, a payment, a subscription,
a license key): a known customer without credit accounts gets `[]`, an unknown one a 404.
An account seen only through a `credit.balance_low` alert has `balance` and `overage` null.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify
from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from ingest.auth import require_admin
from ingest.state import state
from shared.ledger import ChainLink, order_chain
from shared.models import (
    CreditBalance,
    CreditEntry,
    Dispute,
    LicenseKey,
    Payment,
    Refund,
    SnapshotMixin,
    Subscription,
)

bp = Blueprint("records", __name__, url_prefix="/api")
bp.before_request(require_admin)

# The route's segment -> the model, and the name an unknown id's 404 gives it.
RECORDS: dict[str, tuple[type[SnapshotMixin], str]] = {
    "payments": (Payment, "payment"),
    "refunds": (Refund, "refund"),
    "disputes": (Dispute, "dispute"),
    "subscriptions": (Subscription, "subscription"),
    "license-keys": (LicenseKey, "license key"),
}


def not_found(what: str, key: str) -> tuple[Response, int]:
    return jsonify(error=f"{what} {key!r} not found"), 404


def record_view(session: Session, row: SnapshotMixin) -> dict[str, Any]:
    """The record, the event whose state it holds, and the history where it keeps one."""
    view = {**row.representation(), "last_event": row.last_event()}
    history = type(row).history
    if history is not None:
        key = type(row).record_columns()[0]
        entity = getattr(history, key)
        steps = session.scalars(
            select(history)
            .where(entity == getattr(row, key))
            .order_by(history.event_at, history.webhook_ts, history.webhook_id)
        )
        view["history"] = [step.step(key) for step in steps]
    return view


@bp.get(f"/<any({', '.join(map(repr, RECORDS))}):family>/<record_id>")
def get_record(family: str, record_id: str) -> tuple[Response, int]:
    model, what = RECORDS[family]
    with Session(state().engine) as session:
        row = session.get(model, record_id)
        if row is None:
            return not_found(what, record_id)
        return jsonify(record_view(session, row)), 200


def _customer_is_known(session: Session, customer_id: str) -> bool:
    for column in (Payment.customer_id, Subscription.customer_id, LicenseKey.customer_id):
        if session.scalar(select(exists().where(column == customer_id))):
            return True
    return False


@bp.get("/customers/<customer_id>/credits")
def get_customer_credits(customer_id: str) -> tuple[Response, int]:
    with Session(state().engine) as session:
        balances = session.scalars(
            select(CreditBalance)
            .where(CreditBalance.customer_id == customer_id)
            .order_by(CreditBalance.credit_entitlement_id)
        ).all()
        if not balances and not _customer_is_known(session, customer_id):
            return not_found("customer", customer_id)
        return jsonify([balance.representation() for balance in balances]), 200


@bp.get("/customers/<customer_id>/credits/<credit_entitlement_id>/ledger")
def get_credit_ledger(customer_id: str, credit_entitlement_id: str) -> tuple[Response, int]:
    with Session(state().engine) as session:
        account = session.get(CreditBalance, (customer_id, credit_entitlement_id))
        if account is None:
            return not_found("credit account", f"{customer_id}/{credit_entitlement_id}")
        entries = ledger_entries(session, customer_id, credit_entitlement_id)
    return jsonify([entry.representation() for entry in entries]), 200


def ledger_entries(
    session: Session, customer_id: str, credit_entitlement_id: str
) -> list[CreditEntry]:
    """The account's entries in the order its balance is derived in: the last listed is the
    one the balance comes from."""
    entries = session.scalars(
        select(CreditEntry).where(
            CreditEntry.customer_id == customer_id,
            CreditEntry.credit_entitlement_id == credit_entitlement_id,
        )
    ).all()
    by_id = {entry.id: entry for entry in entries}
    return [by_id[link.id] for link in order_chain([ChainLink.of(e) for e in entries]).entries]
