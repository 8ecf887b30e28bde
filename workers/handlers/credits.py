"""Applying credits events to the read model: the ledger, its balance, and the low-balance alert."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db import insert_for, utcnow
from shared.ledger import ChainLink, order_chain
from shared.models import CreditBalance, CreditEntry, Outcome
from shared.schemas import CreditBalanceLowEvent, CreditLedgerEvent
from workers.handlers.base import Delivery, Handler


def _locked_balance(session: Session, customer_id: str, entitlement_id: str) -> CreditBalance:
    """The account's balance row, created if new, locked until the transaction ends.

    Every writer to an account takes this lock first, so two workers adding entries to one
    account at the same moment apply them one after the other and neither is lost.
    """
    insert = insert_for(session)
    session.execute(
        insert(CreditBalance)
        .values(
            customer_id=customer_id,
            credit_entitlement_id=entitlement_id,
            chain_ok=True,
            entry_count=0,
            updated_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=["customer_id", "credit_entitlement_id"])
    )
    return session.execute(
        select(CreditBalance)
        .where(
            CreditBalance.customer_id == customer_id,
            CreditBalance.credit_entitlement_id == entitlement_id,
        )
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one()


def recompute_balance(session: Session, balance: CreditBalance) -> None:
    """Balance, overage and chain_ok from every entry the account holds."""
    rows = session.execute(
        select(
            CreditEntry.id,
            CreditEntry.created_at,
            CreditEntry.balance_before,
            CreditEntry.balance_after,
            CreditEntry.overage_before,
            CreditEntry.overage_after,
        ).where(
            CreditEntry.customer_id == balance.customer_id,
            CreditEntry.credit_entitlement_id == balance.credit_entitlement_id,
        )
    ).all()
    chain = order_chain([ChainLink.of(row) for row in rows])
    newest = chain.newest
    balance.entry_count = len(chain.entries)
    balance.chain_ok = chain.ok
    balance.balance = newest.balance_after if newest else None
    balance.overage = newest.overage_after if newest else None
    balance.last_entry_at = newest.created_at if newest else None
    balance.last_entry_id = newest.id if newest else None
    balance.updated_at = utcnow()


def apply_credit_entry(session: Session, event: CreditLedgerEvent, delivery: Delivery) -> Outcome:
    """Hold the ledger entry once by its Dodo id, then derive the account's balance again."""
    entry = event.data
    balance = _locked_balance(session, entry.customer_id, entry.credit_entitlement_id)
    inserted = session.execute(
        insert_for(session)(CreditEntry)
        .values(
            id=entry.id,
            customer_id=entry.customer_id,
            credit_entitlement_id=entry.credit_entitlement_id,
            transaction_type=entry.transaction_type,
            event_type=event.type,
            is_credit=entry.is_credit,
            amount=entry.amount,
            balance_before=entry.balance_before,
            balance_after=entry.balance_after,
            overage_before=entry.overage_before,
            overage_after=entry.overage_after,
            created_at=entry.created_at,
            webhook_id=delivery.webhook_id,
            data=entry.delivered,
        )
        .on_conflict_do_nothing(index_elements=["id"])
        .returning(CreditEntry.id)
    ).first()
    if inserted is None:
        # The same entry delivered under another delivery id: it already counts.
        return Outcome.SUPERSEDED
    recompute_balance(session, balance)
    return Outcome.APPLIED


def apply_balance_low(
    session: Session, event: CreditBalanceLowEvent, delivery: Delivery
) -> Outcome:
    """Keep the alert that occurred last; an older one arriving late changes nothing."""
    alert = event.data
    balance = _locked_balance(session, alert.customer_id, alert.credit_entitlement_id)
    if balance.alert_at is not None:
        held = (balance.alert_at, balance.alert_webhook_ts or 0, balance.alert_webhook_id or "")
        if delivery.order_key <= held:
            return Outcome.SUPERSEDED
    balance.alert_available_balance = alert.available_balance
    balance.alert_threshold_percent = alert.threshold_percent
    balance.alert_threshold_amount = alert.threshold_amount
    balance.alert_at = delivery.event_at
    balance.alert_webhook_ts = delivery.webhook_ts
    balance.alert_webhook_id = delivery.webhook_id
    balance.updated_at = utcnow()
    return Outcome.APPLIED


LEDGER_TYPES = (
    "credit.added",
    "credit.deducted",
    "credit.expired",
    "credit.rolled_over",
    "credit.rollover_forfeited",
    "credit.overage_charged",
    "credit.manual_adjustment",
    "credit.overage_reset",
)

ROUTES: dict[str, Handler] = {
    **dict.fromkeys(LEDGER_TYPES, apply_credit_entry),
    "credit.balance_low": apply_balance_low,
}
