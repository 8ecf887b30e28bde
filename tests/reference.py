"""A pure-Python reference model of the read API: what it must answer after a set of events.

It knows nothing of the database, the queue or arrival order: given the unique deliveries
(one per webhook id), it applies DESIGN.md's rules directly — the snapshot of the event that
occurred last (envelope timestamp, then webhook-timestamp, then webhook-id), the whole
dispute history, and per credit account the ledger held once per entry id, its chain and
its latest low-balance alert. Written independently of the handlers on purpose.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from functools import cached_property
from typing import Any

# The fields DESIGN.md promises per record, and where each one sits in Dodo's `data`.
SNAPSHOT_FIELDS: dict[str, dict[str, tuple[str, ...]]] = {
    "payments": {
        "payment_id": ("payment_id",),
        "status": ("status",),
        "total_amount": ("total_amount",),
        "currency": ("currency",),
        "customer_id": ("customer", "customer_id"),
        "subscription_id": ("subscription_id",),
        "refund_status": ("refund_status",),
    },
    "refunds": {
        "refund_id": ("refund_id",),
        "payment_id": ("payment_id",),
        "status": ("status",),
        "amount": ("amount",),
        "currency": ("currency",),
    },
    "disputes": {
        "dispute_id": ("dispute_id",),
        "payment_id": ("payment_id",),
        "dispute_status": ("dispute_status",),
        "dispute_stage": ("dispute_stage",),
        "amount": ("amount",),
        "currency": ("currency",),
    },
    "subscriptions": {
        "subscription_id": ("subscription_id",),
        "status": ("status",),
        "product_id": ("product_id",),
        "quantity": ("quantity",),
        "customer_id": ("customer", "customer_id"),
        "next_billing_date": ("next_billing_date",),
        "previous_billing_date": ("previous_billing_date",),
        "cancel_at_next_billing_date": ("cancel_at_next_billing_date",),
        "cancelled_at": ("cancelled_at",),
    },
    "license_keys": {
        "id": ("id",),
        "key": ("key",),
        "status": ("status",),
        "customer_id": ("customer_id",),
        "product_id": ("product_id",),
        "expires_at": ("expires_at",),
    },
}

# The API route of each family, and the `data` field naming the record.
ROUTE = {
    "payments": "payments",
    "refunds": "refunds",
    "disputes": "disputes",
    "subscriptions": "subscriptions",
    "license_keys": "license-keys",
}
IDENTITY = {
    "payments": "payment_id",
    "refunds": "refund_id",
    "disputes": "dispute_id",
    "subscriptions": "subscription_id",
    "license_keys": "id",
}
LEDGER_TYPES = frozenset(
    {
        "credit.added",
        "credit.deducted",
        "credit.expired",
        "credit.rolled_over",
        "credit.rollover_forfeited",
        "credit.overage_charged",
        "credit.manual_adjustment",
        "credit.overage_reset",
    }
)
SUBSCRIPTION_TYPES = frozenset(
    {
        "subscription.active",
        "subscription.updated",
        "subscription.on_hold",
        "subscription.renewed",
        "subscription.plan_changed",
        "subscription.cancelled",
        "subscription.failed",
        "subscription.expired",
    }
)


def family_of(event_type: str) -> str | None:
    """The snapshot family an event type updates; None for credits and ignored types."""
    prefix = event_type.split(".", 1)[0]
    if event_type.startswith("subscription."):
        return "subscriptions" if event_type in SUBSCRIPTION_TYPES else None
    return {
        "payment": "payments",
        "refund": "refunds",
        "dispute": "disputes",
        "license_key": "license_keys",
    }.get(prefix)


@dataclass(frozen=True)
class Sent:
    """One delivery: what the ingest receives (the body) and the signed headers' identity."""

    webhook_id: str
    webhook_ts: int
    envelope: dict[str, Any]

    @property
    def type(self) -> str:
        return str(self.envelope["type"])

    @property
    def data(self) -> dict[str, Any]:
        return dict(self.envelope["data"])

    @cached_property
    def timestamp(self) -> datetime:
        return datetime.fromisoformat(self.envelope["timestamp"])

    @cached_property
    def body(self) -> str:
        return json.dumps(self.envelope)

    @property
    def order_key(self) -> tuple[datetime, int, str]:
        return (self.timestamp, self.webhook_ts, self.webhook_id)


def _dig(data: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = data
    for part in path:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


@dataclass
class Expected:
    """The read API's answers, per family and id; credits per customer and per account."""

    records: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    credits: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    ledgers: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)


def expected_state(deliveries: Iterable[Sent]) -> Expected:
    unique: dict[str, Sent] = {}
    for sent in deliveries:
        unique.setdefault(sent.webhook_id, sent)
    events = sorted(unique.values(), key=lambda s: s.order_key)

    expected = Expected(records={family: {} for family in SNAPSHOT_FIELDS})
    history: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for sent in events:  # occurrence order: the last one standing wins
        family = family_of(sent.type)
        if family is None:
            continue
        data = sent.data
        record = {name: _dig(data, path) for name, path in SNAPSHOT_FIELDS[family].items()}
        record["last_event"] = {
            "type": sent.type,
            "timestamp": sent.timestamp,
            "webhook_id": sent.webhook_id,
        }
        key = str(data[IDENTITY[family]])
        expected.records[family][key] = record
        if family == "disputes":
            history[key].append(
                {
                    "dispute_status": data["dispute_status"],
                    "dispute_stage": data["dispute_stage"],
                    "type": sent.type,
                    "timestamp": sent.timestamp,
                }
            )
    for dispute_id, items in history.items():
        expected.records["disputes"][dispute_id]["history"] = items

    _expect_credits(expected, events)
    return expected


def _expect_credits(expected: Expected, events: list[Sent]) -> None:
    entries: dict[tuple[str, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    alerts: dict[tuple[str, str], Sent] = {}
    for sent in events:
        data = sent.data
        if sent.type in LEDGER_TYPES:
            account = (data["customer_id"], data["credit_entitlement_id"])
            entries[account].setdefault(data["id"], {**data, "type": sent.type})
        elif sent.type == "credit.balance_low":
            # `events` is in occurrence order, so the last assignment is the latest alert.
            alerts[(data["customer_id"], data["credit_entitlement_id"])] = sent
    accounts: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for account in sorted(set(entries) | set(alerts)):
        ledger = chain_order(list(entries[account].values()))
        ok = all(
            _dec(a["balance_after"]) == _dec(b["balance_before"])
            and _dec(a["overage_after"]) == _dec(b["overage_before"])
            for a, b in itertools.pairwise(ledger)
        )
        newest = ledger[-1] if ledger else None
        alert = alerts.get(account)
        accounts[account[0]].append(
            {
                "credit_entitlement_id": account[1],
                "balance": _dec(newest["balance_after"]) if newest else None,
                "overage": _dec(newest["overage_after"]) if newest else None,
                "chain_ok": ok,
                "last_entry_at": datetime.fromisoformat(newest["created_at"]) if newest else None,
                "low_balance_alert": None
                if alert is None
                else {
                    "available_balance": _dec(alert.data["available_balance"]),
                    "threshold_percent": alert.data["threshold_percent"],
                    "threshold_amount": _dec(alert.data["threshold_amount"]),
                    "timestamp": alert.timestamp,
                },
            }
        )
        expected.ledgers[account] = [
            {
                "id": e["id"],
                "type": e["type"],
                "transaction_type": e["transaction_type"],
                "is_credit": e["is_credit"],
                "amount": _dec(e["amount"]),
                "balance_before": _dec(e["balance_before"]),
                "balance_after": _dec(e["balance_after"]),
                "overage_before": _dec(e["overage_before"]),
                "overage_after": _dec(e["overage_after"]),
                "created_at": datetime.fromisoformat(e["created_at"]),
            }
            for e in ledger
        ]
    expected.credits = dict(accounts)


def _dec(value: Any) -> Decimal:
    return Decimal(str(value))


def chain_order(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """By `created_at`; within a tie, follow before -> after from the previous entry.

    A deliberately simple rule (the generator never makes an ambiguous tie): take the tied
    entry that starts where the chain stands; failing that, one no other tied entry leads
    into; failing that, the smallest id.
    """
    by_time: dict[datetime, list[dict[str, Any]]] = defaultdict(list)
    for entry in entries:
        by_time[datetime.fromisoformat(entry["created_at"])].append(entry)
    ordered: list[dict[str, Any]] = []
    for moment in sorted(by_time):
        remaining = sorted(by_time[moment], key=lambda e: e["id"])
        while remaining:
            state = _after(ordered[-1]) if ordered else None
            pick = next((e for e in remaining if _before(e) == state), None)
            if pick is None:
                afters = {_after(e) for e in remaining}
                pick = next((e for e in remaining if _before(e) not in afters), remaining[0])
            remaining.remove(pick)
            ordered.append(pick)
    return ordered


def _before(entry: dict[str, Any]) -> tuple[Decimal, Decimal]:
    return (_dec(entry["balance_before"]), _dec(entry["overage_before"]))


def _after(entry: dict[str, Any]) -> tuple[Decimal, Decimal]:
    return (_dec(entry["balance_after"]), _dec(entry["overage_after"]))


DATETIME_KEYS = frozenset(
    {
        "timestamp",
        "created_at",
        "next_billing_date",
        "previous_billing_date",
        "cancelled_at",
        "expires_at",
        "last_entry_at",
    }
)
DECIMAL_KEYS = frozenset(
    {
        "amount",
        "balance",
        "overage",
        "available_balance",
        "threshold_amount",
        "balance_before",
        "balance_after",
        "overage_before",
        "overage_after",
    }
)


def normalize(value: Any, key: str | None = None) -> Any:
    """One spelling for both sides: ISO strings as datetimes, decimal strings as Decimals."""
    if isinstance(value, dict):
        return {k: normalize(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [normalize(v) for v in value]
    if isinstance(value, str) and key in DATETIME_KEYS:
        return datetime.fromisoformat(value)
    if isinstance(value, str) and key in DECIMAL_KEYS:
        return Decimal(value)
    return value


def differences(expected: Any, answered: Any, where: str = "") -> list[str]:
    """Where `answered` departs from `expected`; keys the reference does not model are skipped."""
    expected, answered = normalize(expected), normalize(answered)
    return _diff(expected, answered, where)


def _diff(expected: Any, answered: Any, where: str) -> list[str]:
    if isinstance(expected, dict) and isinstance(answered, dict):
        found: list[str] = []
        for key, value in expected.items():
            if key not in answered:
                found.append(f"{where}.{key}: missing")
            else:
                found += _diff(value, answered[key], f"{where}.{key}")
        return found
    if isinstance(expected, list) and isinstance(answered, list):
        if len(expected) != len(answered):
            return [f"{where}: {len(answered)} items, expected {len(expected)}"]
        return [
            d
            for i, (e, a) in enumerate(zip(expected, answered, strict=False))
            for d in _diff(e, a, f"{where}[{i}]")
        ]
    if expected != answered:
        return [f"{where}: {answered!r}, expected {expected!r}"]
    return []
