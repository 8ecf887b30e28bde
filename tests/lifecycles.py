"""Seeded random lifecycles of Dodo objects, as the deliveries Dodo would send for them.

Payments (processing -> succeeded/failed/cancelled) with refunds, disputes through their
stages and license keys; subscriptions through active, renewals, holds, plan changes
(product and quantity), updates, cancellation, expiry; credit ledgers with every kind of
entry, overage, rollovers, forfeits, manual adjustments, low-balance alerts — and gaps
(entries never sent). Occurrence timestamps are mostly distinct; some are equal on purpose
so the order falls to the webhook-timestamp, and some webhook-timestamps are equal too so
it falls to the webhook-id. Every payload is a `cli.samples.sample_event`, which the
official SDK's model accepts.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from cli.samples import TRANSACTION_BY_TYPE, sample_event
from tests.reference import Sent

FAMILIES = ("payments", "subscriptions", "credits")

CURRENCIES = ("USD", "EUR", "INR", "GBP")
PRODUCTS = tuple(f"pdt_plan{i}" for i in range(1, 6))
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class Lifecycles:
    """The unique deliveries of a generated world, and what the test should know about it."""

    events: list[Sent] = field(default_factory=list)
    missing_entries: int = 0
    entries_resent_under_new_id: int = 0
    ties: int = 0


class Generator:
    def __init__(self, seed: int, *, now: int, families: tuple[str, ...] = FAMILIES) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.now = now
        self.families = families
        self.world = Lifecycles()
        self.customers = [f"cus_s{seed}_{i:03d}" for i in range(12)]
        self._serial = 0

    # -- identities and clocks -------------------------------------------------------------

    def new_id(self, prefix: str) -> str:
        self._serial += 1
        return f"{prefix}_s{self.seed}_{self._serial:05d}"

    def webhook_id(self) -> str:
        # Random, so the id order says nothing about the lifecycle order.
        return "msg_" + "".join(self.rng.choices("0123456789abcdefghijklmnopqrstuvwxyz", k=20))

    def webhook_ts(self) -> int:
        # Within the ingest's five-minute window for the whole run.
        return self.now + self.rng.randint(-100, 20)

    def start_time(self) -> datetime:
        return EPOCH + timedelta(seconds=self.rng.randint(0, 60 * 86400))

    def later(self, at: datetime, low: int = 60, high: int = 3 * 86400) -> datetime:
        return at + timedelta(seconds=self.rng.randint(low, high))

    def emit(
        self,
        event_type: str,
        at: datetime,
        data: dict[str, Any],
        *,
        tie_with: Sent | None = None,
    ) -> Sent:
        """One delivery; `tie_with` makes it occur at the same instant as an earlier one."""
        webhook_ts = self.webhook_ts()
        if tie_with is not None:
            at = tie_with.timestamp
            self.world.ties += 1
            if self.rng.random() < 0.5:
                webhook_ts = tie_with.webhook_ts  # and then the webhook-id decides
        envelope = sample_event(
            event_type,
            timestamp=at,
            overrides={f"data.{key}": value for key, value in data.items()},
        )
        sent = Sent(self.webhook_id(), webhook_ts, envelope)
        self.world.events.append(sent)
        return sent

    def maybe_tie(self, previous: Sent | None, chance: float = 0.08) -> Sent | None:
        return previous if previous is not None and self.rng.random() < chance else None

    # -- the world -------------------------------------------------------------------------

    def generate(self, target: int) -> Lifecycles:
        makers: list[Callable[[], None]] = []
        if "payments" in self.families:
            makers += [self.payment] * 3
        if "subscriptions" in self.families:
            makers += [self.subscription] * 2
        if "credits" in self.families:
            makers += [self.credit_account]
            # One busy account, so workers apply entries of the same account at the same time.
            self.credit_account(length=max(20, target // 8))
        while len(self.world.events) < target:
            self.rng.choice(makers)()
        for _ in range(max(1, target // 200)):
            # Types nobody routes: stored and ignored, never an error.
            self.emit("payout.created", self.start_time(), {})
        return self.world

    def customer(self) -> dict[str, Any]:
        cid = self.rng.choice(self.customers)
        return {"customer_id": cid, "email": f"{cid}@example.com", "name": cid, "metadata": {}}

    # payments, refunds, disputes, license keys

    def payment(self) -> None:
        customer = self.customer()
        payment_id = self.new_id("pay")
        total = self.rng.randint(500, 90_000)
        currency = self.rng.choice(CURRENCIES)
        data = {
            "payment_id": payment_id,
            "total_amount": total,
            "settlement_amount": total,
            "currency": currency,
            "customer": customer,
            "subscription_id": None,
            "refund_status": None,
        }
        at = self.start_time()
        previous = None
        if self.rng.random() < 0.6:
            previous = self.emit("payment.processing", at, data)
            at = self.later(at, 1, 600)
        outcome = self.rng.choices(
            ["payment.succeeded", "payment.failed", "payment.cancelled"], [75, 15, 10]
        )[0]
        self.emit(outcome, at, data, tie_with=self.maybe_tie(previous))
        if outcome != "payment.succeeded":
            return
        if self.rng.random() < 0.3:
            self.refund(payment_id, total, currency, customer, self.later(at))
        if self.rng.random() < 0.15:
            self.dispute(payment_id, total, currency, self.later(at))
        if self.rng.random() < 0.25:
            self.license_key(payment_id, customer["customer_id"], self.later(at, 1, 60))

    def refund(
        self, payment_id: str, total: int, currency: str, customer: dict[str, Any], at: datetime
    ) -> None:
        data = {
            "refund_id": self.new_id("ref"),
            "payment_id": payment_id,
            "amount": self.rng.randint(1, total),
            "currency": currency,
            "customer": customer,
            "is_partial": False,
        }
        if self.rng.random() < 0.25:
            # Failed first, then retried by the merchant and succeeded.
            first = self.emit("refund.failed", at, {**data, "status": "failed"})
            self.emit(
                "refund.succeeded",
                self.later(at, 60, 86400),
                {**data, "status": "succeeded"},
                tie_with=self.maybe_tie(first, 0.2),
            )
        else:
            kind = self.rng.choices(["succeeded", "failed"], [85, 15])[0]
            self.emit(f"refund.{kind}", at, {**data, "status": kind})

    DISPUTE_PATHS = (
        (("opened", "pre_dispute"), ("challenged", "dispute"), ("won", "dispute")),
        (("opened", "dispute"), ("challenged", "dispute"), ("lost", "dispute")),
        (
            ("opened", "pre_dispute"),
            ("challenged", "dispute"),
            ("challenged", "pre_arbitration"),
            ("lost", "pre_arbitration"),
        ),
        (("opened", "pre_dispute"), ("accepted", "pre_dispute")),
        (("opened", "dispute"), ("expired", "dispute")),
        (("opened", "pre_dispute"), ("cancelled", "pre_dispute")),
        (("opened", "dispute"),),
    )

    def dispute(self, payment_id: str, total: int, currency: str, at: datetime) -> None:
        data = {
            "dispute_id": self.new_id("dis"),
            "payment_id": payment_id,
            "amount": str(Decimal(self.rng.randint(100, total)) / 100),
            "currency": currency,
        }
        previous = None
        for status, stage in self.rng.choice(self.DISPUTE_PATHS):
            previous = self.emit(
                f"dispute.{status}",
                at,
                {**data, "dispute_status": f"dispute_{status}", "dispute_stage": stage},
                tie_with=self.maybe_tie(previous, 0.1),
            )
            at = self.later(at, 3600, 10 * 86400)

    def license_key(self, payment_id: str, customer_id: str, at: datetime) -> None:
        expires = None if self.rng.random() < 0.5 else (at + timedelta(days=365)).isoformat()
        self.emit(
            "license_key.created",
            at,
            {
                "id": self.new_id("lic"),
                "key": f"LK-{self.rng.randrange(16**12):012X}",
                "status": "active",
                "customer_id": customer_id,
                "product_id": self.rng.choice(PRODUCTS),
                "payment_id": payment_id,
                "expires_at": expires,
            },
        )

    # subscriptions

    def subscription(self) -> None:
        at = self.start_time()
        state: dict[str, Any] = {
            "subscription_id": self.new_id("sub"),
            "customer": self.customer(),
            "product_id": self.rng.choice(PRODUCTS),
            "quantity": self.rng.randint(1, 5),
            "status": "active",
            "previous_billing_date": at.isoformat(),
            "next_billing_date": (at + timedelta(days=30)).isoformat(),
            "cancel_at_next_billing_date": False,
            "cancelled_at": None,
        }
        previous: Sent | None = None

        def send(event_type: str, **changes: Any) -> None:
            nonlocal previous
            state.update(changes)
            previous = self.emit(event_type, at, dict(state), tie_with=self.maybe_tie(previous))

        if self.rng.random() < 0.05:
            send("subscription.failed", status="failed")
            return
        send("subscription.active")
        for _ in range(self.rng.randint(1, 8)):
            step = self.rng.choices(
                ["renewed", "on_hold", "plan_changed", "updated"], [50, 15, 20, 15]
            )[0]
            next_billing = datetime.fromisoformat(state["next_billing_date"])
            if step == "renewed":
                at = next_billing
                send(
                    "subscription.renewed",
                    status="active",
                    previous_billing_date=next_billing.isoformat(),
                    next_billing_date=(next_billing + timedelta(days=30)).isoformat(),
                )
            elif step == "on_hold":
                at = next_billing + timedelta(minutes=self.rng.randint(1, 120))
                send("subscription.on_hold", status="on_hold")
                at = self.later(at, 3600, 5 * 86400)
                send(
                    self.rng.choice(["subscription.active", "subscription.renewed"]),
                    status="active",
                    previous_billing_date=at.isoformat(),
                    next_billing_date=(at + timedelta(days=30)).isoformat(),
                )
            elif step == "plan_changed":
                at = self.later(at, 60, 20 * 86400)
                if self.rng.random() < 0.5:
                    send("subscription.plan_changed", product_id=self.rng.choice(PRODUCTS))
                else:
                    send("subscription.plan_changed", quantity=self.rng.randint(1, 20))
            else:
                at = self.later(at, 60, 20 * 86400)
                send("subscription.updated", cancel_at_next_billing_date=self.rng.random() < 0.5)
        ending = self.rng.choices(["cancelled", "expired", "running"], [40, 20, 40])[0]
        if ending == "cancelled":
            at = self.later(at, 60, 20 * 86400)
            send("subscription.cancelled", status="cancelled", cancelled_at=at.isoformat())
            if self.rng.random() < 0.5:
                at = datetime.fromisoformat(state["next_billing_date"])
                send("subscription.expired", status="expired")
        elif ending == "expired":
            at = datetime.fromisoformat(state["next_billing_date"])
            send("subscription.expired", status="expired")

    # credits

    def credit_account(self, length: int | None = None) -> None:
        customer_id = self.rng.choice(self.customers)
        entitlement = self.new_id("cde")
        at = self.start_time()
        # Sometimes the service starts receiving mid-way: the first entry held is not at zero.
        balance = Decimal(0) if self.rng.random() < 0.6 else self.money(10_000)
        overage = Decimal(0)
        entries: list[tuple[str, dict[str, Any], bool]] = []  # (type, data, tied to previous)
        for _ in range(length or self.rng.randint(6, 30)):
            kind, amount, new_balance, new_overage = self.ledger_step(balance, overage)
            tied = (
                bool(entries)
                and kind == "credit.deducted"
                and entries[-1][0] == "credit.deducted"
                and self.rng.random() < 0.35
            )
            if not tied:
                at = self.later(at, 1, 2 * 86400)
            transaction_type, is_credit = TRANSACTION_BY_TYPE[kind]
            if kind == "credit.manual_adjustment":
                is_credit = new_balance > balance
            entries.append(
                (
                    kind,
                    {
                        # Random, so the id order of a tie says nothing about its chain order.
                        "id": "cle_" + self.webhook_id()[4:],
                        "customer_id": customer_id,
                        "credit_entitlement_id": entitlement,
                        "transaction_type": transaction_type,
                        "is_credit": is_credit,
                        "amount": str(amount),
                        "balance_before": str(balance),
                        "balance_after": str(new_balance),
                        "overage_before": str(overage),
                        "overage_after": str(new_overage),
                        "created_at": at.isoformat(),
                    },
                    tied,
                )
            )
            balance, overage = new_balance, new_overage
        missing = self.gaps(entries)
        previous: Sent | None = None
        for index, (kind, data, _tied) in enumerate(entries):
            if index in missing:
                continue
            created = datetime.fromisoformat(data["created_at"])
            previous = self.emit(kind, created, data)
            if self.rng.random() < 0.04:
                # Dodo sent the same ledger entry again under a new delivery id.
                self.world.events.append(
                    Sent(self.webhook_id(), self.webhook_ts(), previous.envelope)
                )
                self.world.entries_resent_under_new_id += 1
        self.balance_alerts(customer_id, entitlement, entries)

    def money(self, cents_high: int) -> Decimal:
        return Decimal(self.rng.randint(1, cents_high)) / 100

    def ledger_step(
        self, balance: Decimal, overage: Decimal
    ) -> tuple[str, Decimal, Decimal, Decimal]:
        """One entry after (balance, overage): its type, amount, and the state it leaves."""
        choices = [
            "credit.added",
            "credit.deducted",
            "credit.rolled_over",
            "credit.manual_adjustment",
        ]
        weights = [25, 40, 5, 5]
        if balance > 0:
            choices += ["credit.expired", "credit.rollover_forfeited"]
            weights += [5, 4]
        if overage > 0:
            choices.append("credit.overage_reset")
            weights.append(6)
        kind = self.rng.choices(choices, weights)[0]
        amount = self.money(20_000)
        if kind in ("credit.added", "credit.rolled_over"):
            return kind, amount, balance + amount, overage
        if kind == "credit.manual_adjustment":
            if balance > 0 and self.rng.random() < 0.5:
                amount = min(amount, balance)
                return kind, amount, balance - amount, overage
            return kind, amount, balance + amount, overage
        if kind in ("credit.expired", "credit.rollover_forfeited"):
            amount = min(amount, balance)
            return kind, amount, balance - amount, overage
        if kind == "credit.overage_reset":
            return kind, overage, balance, Decimal(0)
        # Usage: from the balance while it lasts, the rest charged as overage.
        if amount <= balance:
            return "credit.deducted", amount, balance - amount, overage
        return "credit.overage_charged", amount, Decimal(0), overage + (amount - balance)

    def gaps(self, entries: list[tuple[str, dict[str, Any], bool]]) -> set[int]:
        """Entries never delivered: inside the chain, never in or beside a tie."""
        if len(entries) < 5 or self.rng.random() < 0.6:
            return set()
        candidates = [
            i for i in range(1, len(entries) - 1) if not entries[i][2] and not entries[i + 1][2]
        ]
        picked = set(self.rng.sample(candidates, min(len(candidates), self.rng.randint(1, 2))))
        self.world.missing_entries += len(picked)
        return picked

    def balance_alerts(
        self, customer_id: str, entitlement: str, entries: list[tuple[str, dict[str, Any], bool]]
    ) -> None:
        previous: Sent | None = None
        for _ in range(self.rng.choice([0, 0, 1, 2, 3])):
            moment = datetime.fromisoformat(self.rng.choice(entries)[1]["created_at"])
            previous = self.emit(
                "credit.balance_low",
                moment + timedelta(seconds=self.rng.randint(1, 600)),
                {
                    "customer_id": customer_id,
                    "credit_entitlement_id": entitlement,
                    "subscription_id": self.new_id("sub"),
                    "available_balance": str(self.money(2_000)),
                    "threshold_amount": str(self.money(5_000)),
                    "threshold_percent": self.rng.choice([5, 10, 20, 25]),
                },
                tie_with=self.maybe_tie(previous, 0.3),
            )


def generate(
    seed: int, *, target: int, now: int, families: tuple[str, ...] = FAMILIES
) -> Lifecycles:
    return Generator(seed, now=now, families=families).generate(target)


def with_duplicates(events: list[Sent], ratio: float, rng: random.Random) -> list[Sent]:
    """The deliveries shuffled, with `ratio` of them sent again under the same webhook-id."""
    again = rng.sample(events, round(len(events) * ratio))
    deliveries = events + again
    rng.shuffle(deliveries)
    return deliveries
