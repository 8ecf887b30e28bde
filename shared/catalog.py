"""Every Dodo event type this product knows, its family, and the Celery queue it travels on."""

from __future__ import annotations

from typing import Final

# The 30 types DESIGN.md promises to apply, by family. The family is also the queue name,
# so a worker can be dedicated to one family with `-Q credits`.
HANDLED: Final[dict[str, tuple[str, ...]]] = {
    "payments": (
        "payment.succeeded",
        "payment.failed",
        "payment.processing",
        "payment.cancelled",
    ),
    "refunds": ("refund.succeeded", "refund.failed"),
    "disputes": (
        "dispute.opened",
        "dispute.expired",
        "dispute.accepted",
        "dispute.cancelled",
        "dispute.challenged",
        "dispute.won",
        "dispute.lost",
    ),
    "subscriptions": (
        "subscription.active",
        "subscription.updated",
        "subscription.on_hold",
        "subscription.renewed",
        "subscription.plan_changed",
        "subscription.cancelled",
        "subscription.failed",
        "subscription.expired",
    ),
    "license_keys": ("license_key.created",),
    "credits": (
        "credit.added",
        "credit.deducted",
        "credit.expired",
        "credit.rolled_over",
        "credit.rollover_forfeited",
        "credit.overage_charged",
        "credit.manual_adjustment",
        "credit.balance_low",
    ),
}

# Types the official SDK knows beyond those: accepted, stored, and `ignored` unless a
# handler is routed for them in workers/handlers.
KNOWN_OTHER: Final[tuple[str, ...]] = (
    "subscription.past_due",
    "subscription.paused",
    "subscription.unpaused",
    "subscription.update_payment_method",
    "credit.overage_reset",
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

HANDLED_TYPES: Final[tuple[str, ...]] = tuple(t for types in HANDLED.values() for t in types)
ALL_KNOWN_TYPES: Final[tuple[str, ...]] = HANDLED_TYPES + KNOWN_OTHER
FAMILY_OF: Final[dict[str, str]] = {t: family for family, types in HANDLED.items() for t in types}
# A few SDK-known types are worth applying; they travel with their family.
FAMILY_OF.update(
    {
        "subscription.past_due": "subscriptions",
        "subscription.paused": "subscriptions",
        "subscription.unpaused": "subscriptions",
        "subscription.update_payment_method": "subscriptions",
        "credit.overage_reset": "credits",
    }
)
EVENT_QUEUES: Final[tuple[str, ...]] = (*HANDLED, OTHER_QUEUE)


def queue_for(event_type: str | None) -> str:
    """The queue an event of this type is processed from."""
    return FAMILY_OF.get(event_type or "", OTHER_QUEUE)
