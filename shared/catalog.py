"""Every Dodo event type this product knows, written once: its kind and its family's queue.

The kind is the shape of the event's `data` (one schema, one handler); the family is the
Celery queue it travels on, so a worker can be dedicated to one family with `-Q credits`.
The schemas' unions (workers/schemas.py), the routing table (workers/handlers) and the
queues (shared/queue.py) are derived from this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class Kind:
    family: str
    # The types DESIGN.md promises to apply (30 in all).
    promised: tuple[str, ...]
    # Types the official SDK knows beyond those, applied too: they carry the same state.
    beyond: tuple[str, ...] = ()
    # The type `dodo-webhooks reconcile` stamps on an object whose status no webhook type
    # names (a refund `pending`, a payment `requires_capture`): Dodo never sends it.
    reconciled: str | None = None

    @property
    def types(self) -> tuple[str, ...]:
        return self.promised + self.beyond + ((self.reconciled,) if self.reconciled else ())


KINDS: Final[dict[str, Kind]] = {
    "payment": Kind(
        "payments",
        ("payment.succeeded", "payment.failed", "payment.processing", "payment.cancelled"),
        reconciled="payment.reconciled",
    ),
    "refund": Kind(
        "refunds", ("refund.succeeded", "refund.failed"), reconciled="refund.reconciled"
    ),
    "dispute": Kind(
        "disputes",
        (
            "dispute.opened",
            "dispute.expired",
            "dispute.accepted",
            "dispute.cancelled",
            "dispute.challenged",
            "dispute.won",
            "dispute.lost",
        ),
        reconciled="dispute.reconciled",
    ),
    "subscription": Kind(
        "subscriptions",
        (
            "subscription.active",
            "subscription.updated",
            "subscription.on_hold",
            "subscription.renewed",
            "subscription.plan_changed",
            "subscription.cancelled",
            "subscription.failed",
            "subscription.expired",
        ),
        beyond=(
            "subscription.past_due",
            "subscription.paused",
            "subscription.unpaused",
            "subscription.update_payment_method",
        ),
        reconciled="subscription.reconciled",
    ),
    "license_key": Kind(
        "license_keys", ("license_key.created",), reconciled="license_key.reconciled"
    ),
    "credit_entry": Kind(
        "credits",
        (
            "credit.added",
            "credit.deducted",
            "credit.expired",
            "credit.rolled_over",
            "credit.rollover_forfeited",
            "credit.overage_charged",
            "credit.manual_adjustment",
        ),
        beyond=("credit.overage_reset",),
        reconciled="credit.reconciled",
    ),
    "credit_balance_low": Kind("credits", ("credit.balance_low",)),
}

# Types the official SDK knows that nothing applies: accepted, stored and `ignored`.
IGNORED: Final[tuple[str, ...]] = (
    "payout.created",
    "payout.failed",
    "payout.in_progress",
    "payout.on_hold",
    "payout.success",
    "abandoned_checkout.detected",
    "abandoned_checkout.recovered",
    "dunning.started",
    "dunning.recovered",
    "entitlement_grant.created",
    "entitlement_grant.delivered",
    "entitlement_grant.failed",
    "entitlement_grant.revoked",
)

# Events nobody routes (unknown or ignored types) still go through a worker to be marked.
OTHER_QUEUE: Final = "other"
# Re-drive and other housekeeping, so a backlog of events never delays them.
MAINTENANCE_QUEUE: Final = "maintenance"
# The change feed's outbound deliveries: a slow merchant endpoint never queues ahead of events.
OUTBOUND_QUEUE: Final = "outbound"

KIND_OF: Final[dict[str, str]] = {t: name for name, kind in KINDS.items() for t in kind.types}
FAMILY_OF: Final[dict[str, str]] = {t: KINDS[name].family for t, name in KIND_OF.items()}

# The 30 promised types by family, in the table's order.
HANDLED: Final[dict[str, tuple[str, ...]]] = {}
for _kind in KINDS.values():
    HANDLED[_kind.family] = HANDLED.get(_kind.family, ()) + _kind.promised
HANDLED_TYPES: Final[tuple[str, ...]] = tuple(t for types in HANDLED.values() for t in types)
# What the SDK knows beyond the 30: applied (`beyond`) or ignored.
KNOWN_OTHER: Final[tuple[str, ...]] = (
    *(t for kind in KINDS.values() for t in kind.beyond),
    *IGNORED,
)
ALL_KNOWN_TYPES: Final[tuple[str, ...]] = HANDLED_TYPES + KNOWN_OTHER
EVENT_QUEUES: Final[tuple[str, ...]] = (*HANDLED, OTHER_QUEUE)


def types_of(kind: str) -> tuple[str, ...]:
    return KINDS[kind].types


def queue_for(event_type: str | None) -> str:
    """The queue an event of this type is processed from."""
    return FAMILY_OF.get(event_type or "", OTHER_QUEUE)
