"""Applying credits events to the read model: the ledger, its balance, and the low-balance alert."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.orm import Session

from shared.changes import Cause, record_change
from shared.db import insert_once, utcnow
from shared.ledger import ChainLink, order_chain
from shared.models import CreditBalance, CreditEntry, Outcome
from workers.handlers.base import Delivery
from workers.schemas import CreditBalanceLowEvent, CreditLedgerEvent
from workers.statements import execute

BALANCES = cast(Table, CreditBalance.__table__)
ENTRIES = cast(Table, CreditEntry.__table__)
ACCOUNT = ("customer_id", "credit_entitlement_id")
# The entry's columns that are fields of Dodo's ledger entry of the same name.
ENTRY_FIELDS = tuple(
    c.key for c in ENTRIES.columns if c.key not in ("event_type", "webhook_id", "data")
)

# Statements built once (building them per event cost more CPU than running them).
_LOCK = (
    select(BALANCES)
    .where(*(BALANCES.c[name] == bindparam(name) for name in ACCOUNT))
    .with_for_update()
)
_LEDGER = select(
    ENTRIES.c.id,
    ENTRIES.c.created_at,
    ENTRIES.c.balance_before,
    ENTRIES.c.balance_after,
    ENTRIES.c.overage_before,
    ENTRIES.c.overage_after,
).where(*(ENTRIES.c[name] == bindparam(name) for name in ACCOUNT))
# The SET clause is the columns given at execution; the key goes by these names.
_UPDATE = (
    update(BALANCES)
    .where(*(BALANCES.c[name] == bindparam(f"key_{name}") for name in ACCOUNT))
    .returning(*BALANCES.c)
)


def _dialect(session: Session) -> str:
    return session.get_bind().dialect.name


def _locked_balance(session: Session, customer_id: str, entitlement_id: str) -> dict[str, Any]:
    """The account's balance row, created if new, locked until the transaction ends.

    Every writer to an account takes this lock first, so two workers adding entries to one
    account at the same moment apply them one after the other and neither is lost. The
    row carries `_new` when this transaction created it (the change feed's `before` is null).
    """
    key = {"customer_id": customer_id, "credit_entitlement_id": entitlement_id}
    row = execute(session, _LOCK, key).mappings().first()
    new = False
    if row is None:
        fresh = {**key, "chain_ok": True, "entry_count": 0, "updated_at": utcnow()}
        insert = insert_once(_dialect(session), BALANCES, ACCOUNT, ("customer_id",))
        new = execute(session, insert, fresh).first() is not None
        row = execute(session, _LOCK, key).mappings().one()
    return {**row, "_new": new}


def balance_view(row: Any) -> dict[str, Any]:
    """The account as the `/credits` item shows it, from a row as the driver returned it."""
    values = {}
    for column in BALANCES.columns:
        value = row[column.name]
        if isinstance(value, datetime):
            value = value.astimezone(UTC)
        values[column.key] = value
    return CreditBalance(**values).representation()


def _save(
    session: Session,
    balance: dict[str, Any],
    changes: dict[str, Any],
    event: CreditLedgerEvent | CreditBalanceLowEvent,
    delivery: Delivery,
) -> None:
    """Write the account's new state, and the change of its representation if any."""
    key = {f"key_{name}": balance[name] for name in ACCOUNT}
    written = execute(session, _UPDATE, {**changes, "updated_at": utcnow(), **key})
    after = balance_view(written.mappings().one())
    record_change(
        session,
        kind="credit_balance",
        entity_id=f"{balance['customer_id']}:{balance['credit_entitlement_id']}",
        customer_id=balance["customer_id"],
        before=None if balance["_new"] else balance_view(balance),
        after=after,
        cause=Cause(delivery.webhook_id, event.type, delivery.event_at),
        run=execute,
    )


def recompute_balance(session: Session, customer_id: str, entitlement_id: str) -> dict[str, Any]:
    """Balance, overage and chain_ok from every entry the account holds."""
    key = {"customer_id": customer_id, "credit_entitlement_id": entitlement_id}
    rows = execute(session, _LEDGER, key).all()
    chain = order_chain([ChainLink.of(row) for row in rows])
    newest = chain.newest
    return {
        "entry_count": len(chain.entries),
        "chain_ok": chain.ok,
        "balance": newest.balance_after if newest else None,
        "overage": newest.overage_after if newest else None,
        "last_entry_at": newest.created_at if newest else None,
        "last_entry_id": newest.id if newest else None,
    }


def apply_credit_entry(session: Session, event: CreditLedgerEvent, delivery: Delivery) -> Outcome:
    """Hold the ledger entry once by its Dodo id, then derive the account's balance again."""
    entry = event.data
    balance = _locked_balance(session, entry.customer_id, entry.credit_entitlement_id)
    row = {
        **{name: getattr(entry, name) for name in ENTRY_FIELDS},
        "event_type": event.type,
        "webhook_id": delivery.webhook_id,
        "data": entry.delivered,
    }
    inserted = execute(session, insert_once(_dialect(session), ENTRIES, ("id",), ("id",)), row)
    inserted_id = inserted.first()
    if inserted_id is None:
        # The same entry delivered under another delivery id: it already counts.
        return Outcome.SUPERSEDED
    newest_at = balance["last_entry_at"]
    if newest_at is not None and entry.created_at > newest_at:
        # The usual case, an entry newer than all held: it extends the chain, so the
        # balance follows without reading the whole ledger again.
        held = (balance["balance"], balance["overage"])
        links = (entry.balance_before, entry.overage_before) == held
        changes = {
            "chain_ok": balance["chain_ok"] and links,
            "balance": entry.balance_after,
            "overage": entry.overage_after,
            "last_entry_at": entry.created_at,
            "last_entry_id": entry.id,
            "entry_count": balance["entry_count"] + 1,
        }
    else:
        # Older than the newest, tied with it, or the first: the order may change anywhere.
        changes = recompute_balance(session, entry.customer_id, entry.credit_entitlement_id)
    _save(session, balance, changes, event, delivery)
    return Outcome.APPLIED


def apply_balance_low(
    session: Session, event: CreditBalanceLowEvent, delivery: Delivery
) -> Outcome:
    """Keep the alert that occurred last; an older one arriving late changes nothing."""
    alert = event.data
    balance = _locked_balance(session, alert.customer_id, alert.credit_entitlement_id)
    if balance["alert_at"] is not None:
        held = (
            balance["alert_at"],
            balance["alert_webhook_ts"] or 0,
            balance["alert_webhook_id"] or "",
        )
        if delivery.order_key <= held:
            return Outcome.SUPERSEDED
    changes = {
        "alert_available_balance": alert.available_balance,
        "alert_threshold_percent": alert.threshold_percent,
        "alert_threshold_amount": alert.threshold_amount,
        "alert_at": delivery.event_at,
        "alert_webhook_ts": delivery.webhook_ts,
        "alert_webhook_id": delivery.webhook_id,
    }
    _save(session, balance, changes, event, delivery)
    return Outcome.APPLIED
