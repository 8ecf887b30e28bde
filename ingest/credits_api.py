"""The credit ledger on the admin API: balances per entitlement, and each ledger in order.

A customer is known once any record names them (a credit account, a payment, a subscription,
a license key): a known customer without credit accounts gets `[]`, an unknown one a 404.
An account seen only through a `credit.balance_low` alert has `balance` and `overage` null.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from flask import Response, jsonify
from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from ingest.api import bp, not_found
from ingest.app import state
from shared.ledger import ChainLink, order_chain
from shared.models import CreditBalance, CreditEntry, LicenseKey, Payment, Subscription, isoformat


def amount(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def _customer_is_known(session: Session, customer_id: str) -> bool:
    for column in (Payment.customer_id, Subscription.customer_id, LicenseKey.customer_id):
        if session.scalar(select(exists().where(column == customer_id))):
            return True
    return False


def account_summary(balance: CreditBalance) -> dict[str, Any]:
    alert = None
    if balance.alert_at is not None:
        alert = {
            "available_balance": amount(balance.alert_available_balance),
            "threshold_percent": balance.alert_threshold_percent,
            "threshold_amount": amount(balance.alert_threshold_amount),
            "timestamp": isoformat(balance.alert_at),
        }
    return {
        "credit_entitlement_id": balance.credit_entitlement_id,
        "balance": amount(balance.balance),
        "overage": amount(balance.overage),
        "chain_ok": balance.chain_ok,
        "last_entry_at": isoformat(balance.last_entry_at),
        "entry_count": balance.entry_count,
        "low_balance_alert": alert,
    }


def entry_summary(entry: CreditEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "type": entry.event_type,
        "transaction_type": entry.transaction_type,
        "is_credit": entry.is_credit,
        "amount": amount(entry.amount),
        "balance_before": amount(entry.balance_before),
        "balance_after": amount(entry.balance_after),
        "overage_before": amount(entry.overage_before),
        "overage_after": amount(entry.overage_after),
        "created_at": isoformat(entry.created_at),
        "webhook_id": entry.webhook_id,
    }


@bp.get("/customers/<customer_id>/credits")
def get_customer_credits(customer_id: str) -> tuple[Response, int]:
    with Session(state().engine) as session:
        balances = (
            session.execute(
                select(CreditBalance)
                .where(CreditBalance.customer_id == customer_id)
                .order_by(CreditBalance.credit_entitlement_id)
            )
            .scalars()
            .all()
        )
        if not balances and not _customer_is_known(session, customer_id):
            return not_found("customer", customer_id)
        return jsonify([account_summary(b) for b in balances]), 200


@bp.get("/customers/<customer_id>/credits/<credit_entitlement_id>/ledger")
def get_credit_ledger(customer_id: str, credit_entitlement_id: str) -> tuple[Response, int]:
    with Session(state().engine) as session:
        account = session.get(CreditBalance, (customer_id, credit_entitlement_id))
        if account is None:
            return not_found("credit account", f"{customer_id}/{credit_entitlement_id}")
        entries = (
            session.execute(
                select(CreditEntry).where(
                    CreditEntry.customer_id == customer_id,
                    CreditEntry.credit_entitlement_id == credit_entitlement_id,
                )
            )
            .scalars()
            .all()
        )
    by_id = {entry.id: entry for entry in entries}
    # The order the balance is derived in, so the last entry listed is the one it comes from.
    chain = order_chain([ChainLink.of(entry) for entry in entries])
    return jsonify([entry_summary(by_id[link.id]) for link in chain.entries]), 200
