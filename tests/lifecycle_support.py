"""Two customers' worth of realistic events, applied through the workers' own claim and apply."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, Interval, delete, literal, select, text, update
from sqlalchemy.orm import Session

from cli.samples import sample_event
from ingest.recording import record_delivery
from shared.bodies import day_of, ensure_days
from shared.db import make_sessionmaker, transaction
from shared.envelope import event_subjects
from shared.models import (
    CreditBalance,
    Dispute,
    EventBody,
    Payment,
    Refund,
    Subscription,
    WebhookEvent,
)
from tests.handlers.events import T0
from workers.claims import apply_event, claim_event
from workers.handlers.credits import apply_credit_entry  # noqa: F401 - routes import handlers

PG_DUMP = "/usr/lib/postgresql/15/bin/pg_dump"


@dataclass(frozen=True)
class Person:
    """A customer and the personal data their events carry."""

    customer_id: str
    name: str
    email: str
    phone: str
    street: str
    city: str
    zipcode: str
    tax_id: str
    card_holder: str

    @property
    def secrets(self) -> dict[str, str]:
        """The strings that must be gone after an erasure (name, email, phone, address...)."""
        return {
            "name": self.name,
            "email": self.email,
            "phone": self.phone,
            "street": self.street,
            "city": self.city,
            "zipcode": self.zipcode,
            "tax_id": self.tax_id,
            "card_holder": self.card_holder,
        }

    def customer(self) -> dict[str, Any]:
        return {
            "customer_id": self.customer_id,
            "email": self.email,
            "name": self.name,
            "phone_number": self.phone,
            "metadata": {"crm_note": f"called {self.name} at {self.phone}"},
        }

    def billing(self) -> dict[str, Any]:
        return {
            "country": "DE",
            "city": self.city,
            "street": self.street,
            "zipcode": self.zipcode,
            "state": "Berlin",
        }


ALICE = Person(
    "cus_alice0001",
    "Alice Liddell",
    "alice.liddell@example.org",
    "+4915112345678",
    "17 Rabbit Hole Lane",
    "Wonderburg",
    "10115",
    "DE123456789",
    "A LIDDELL",
)
BOB = Person(
    "cus_bob000002",
    "Bob Builder",
    "bob.builder@example.net",
    "+14155550199",
    "1 Construction Way",
    "Fixington",
    "94107",
    "US987654321",
    "B BUILDER",
)


def body_for(event_type: str, person: Person, when: datetime, **data: Any) -> dict[str, Any]:
    """A sample event of `event_type` carrying `person`'s personal data wherever Dodo does."""
    overrides: dict[str, Any] = {f"data.{k}": v for k, v in data.items()}
    envelope = sample_event(event_type, timestamp=when, overrides=overrides)
    payload = envelope["data"]
    if "customer" in payload:
        payload["customer"] = person.customer()
    if "customer_id" in payload and "customer" not in payload:
        payload["customer_id"] = person.customer_id
    if "billing" in payload:
        payload["billing"] = person.billing()
    if event_type.startswith("payment."):
        payload.update(card_holder_name=person.card_holder, card_last_four="4242")
        payload["metadata"] = {"order_note": f"ship to {person.street}"}
    if event_type.startswith("subscription."):
        payload.update(tax_id=person.tax_id, customer_business_name=f"{person.name} GmbH")
    if event_type.startswith("dispute."):
        payload["remarks"] = f"cardholder {person.name} says not received"
    return envelope


def age(engine: Engine, webhook_ids: list[str], days: float) -> None:
    """As if these events had been received (and finished) `days` earlier: their times, and
    their bodies moved to that day's partition, made if it is not there."""
    delta = literal(timedelta(days=days), Interval())
    ev = WebhookEvent
    with engine.connect() as conn:
        times = conn.execute(select(ev.received_at).where(ev.webhook_id.in_(webhook_ids)))
        wanted = [day_of(at - timedelta(days=days)) for at in times.scalars()]
    ensure_days(engine, min(wanted), max(wanted))
    with engine.begin() as conn:
        conn.execute(
            update(ev)
            .where(ev.webhook_id.in_(webhook_ids))
            .values(
                received_at=ev.received_at - delta,
                enqueued_at=ev.enqueued_at - delta,
                processed_at=ev.processed_at - delta,
            )
        )
        conn.execute(
            update(EventBody)
            .where(EventBody.webhook_id.in_(webhook_ids))
            .values(stored_at=EventBody.stored_at - delta)
        )


def into_rows(engine: Engine, webhook_ids: list[str]) -> None:
    """As if recorded before migration 0008: the body and headers in the event's row."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE webhook_events AS e SET body = b.body, headers = b.headers"
                " FROM event_bodies AS b WHERE b.webhook_id = e.webhook_id"
                " AND b.stored_at = e.received_at AND e.webhook_id = ANY(:ids)"
            ),
            {"ids": webhook_ids},
        )
        conn.execute(delete(EventBody).where(EventBody.webhook_id.in_(webhook_ids)))


class Feed:
    """Records deliveries as the ingest does, and applies them as a worker does."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.factory = make_sessionmaker(engine)
        self.count = 0

    def record(self, envelope: dict[str, Any], webhook_id: str | None = None) -> str:
        self.count += 1
        webhook_id = webhook_id or f"msg_life_{self.count:05d}"
        body = json.dumps(envelope).encode()
        when = datetime.fromisoformat(envelope["timestamp"])
        record_delivery(
            self.engine,
            webhook_id=webhook_id,
            webhook_ts=int(when.timestamp()),
            headers={"webhook-id": webhook_id, "webhook-signature": "v1,c2lnbmVk"},
            body=body,
            event_type=envelope["type"],
            event_at=when,
            subjects=event_subjects(envelope["type"], envelope["data"]),
        )
        return webhook_id

    def apply(self, webhook_id: str) -> str:
        claim = claim_event(self.factory, webhook_id, 300, None)
        assert claim is not None, webhook_id
        with transaction(self.factory) as session:
            status, _ = apply_event(session, claim)
        return str(status)

    def send(self, envelope: dict[str, Any], webhook_id: str | None = None) -> str:
        webhook_id = self.record(envelope, webhook_id)
        self.apply(webhook_id)
        return webhook_id


def history_of(feed: Feed, person: Person, start: datetime = T0, tag: str = "") -> None:
    """A payment, its refund and dispute, a subscription's life, a license key, credits."""
    cid = person.customer_id
    pay, sub = f"pay_{cid}{tag}", f"sub_{cid}{tag}"
    t = start
    feed.send(body_for("payment.processing", person, t, payment_id=pay, subscription_id=sub))
    feed.send(body_for("payment.succeeded", person, t + timedelta(minutes=1), payment_id=pay))
    feed.send(
        body_for("subscription.active", person, t + timedelta(minutes=2), subscription_id=sub)
    )
    feed.send(
        body_for("subscription.renewed", person, t + timedelta(minutes=3), subscription_id=sub)
    )
    feed.send(
        body_for(
            "refund.succeeded",
            person,
            t + timedelta(minutes=4),
            payment_id=pay,
            refund_id=f"ref_{cid}{tag}",
        )
    )
    for step, kind in enumerate(("dispute.opened", "dispute.challenged", "dispute.won")):
        feed.send(
            body_for(
                kind,
                person,
                t + timedelta(minutes=5 + step),
                payment_id=pay,
                dispute_id=f"dis_{cid}{tag}",
            )
        )
    feed.send(
        body_for(
            "license_key.created",
            person,
            t + timedelta(minutes=9),
            id=f"lic_{cid}{tag}",
            payment_id=pay,
        )
    )
    balance = Decimal("0")
    for n in range(3):
        amount = Decimal("10.00")
        feed.send(
            body_for(
                "credit.added",
                person,
                t + timedelta(minutes=10 + n),
                id=f"cle_{cid}{tag}_{n}",
                credit_entitlement_id="cde_main",
                amount=str(amount),
                balance_before=str(balance),
                balance_after=str(balance + amount),
                description=f"top-up for {person.email}",
            )
        )
        balance += amount
    feed.send(
        body_for(
            "credit.balance_low",
            person,
            t + timedelta(minutes=14),
            credit_entitlement_id="cde_main",
            available_balance="30.00",
        )
    )


def state_of(engine: Engine, person: Person) -> dict[str, Any]:
    """What must not change in an erasure: balances, chain_ok, statuses, amounts, ids."""
    cid = person.customer_id
    with Session(engine) as session:
        balances = [
            (b.credit_entitlement_id, b.balance, b.overage, b.chain_ok, b.entry_count)
            for b in session.scalars(select(CreditBalance).where(CreditBalance.customer_id == cid))
        ]
        payments = session.scalars(select(Payment).where(Payment.customer_id == cid)).all()
        payment_ids = [p.payment_id for p in payments]
        return {
            "balances": sorted(balances),
            "payments": sorted((p.payment_id, p.status, p.total_amount) for p in payments),
            "refunds": sorted(
                (r.refund_id, r.status, r.amount)
                for r in session.scalars(select(Refund).where(Refund.payment_id.in_(payment_ids)))
            ),
            "disputes": sorted(
                (d.dispute_id, d.dispute_status, d.amount)
                for d in session.scalars(select(Dispute).where(Dispute.payment_id.in_(payment_ids)))
            ),
            "subscriptions": sorted(
                (s.subscription_id, s.status, s.quantity)
                for s in session.scalars(
                    select(Subscription).where(Subscription.customer_id == cid)
                )
            ),
            "events": sorted(
                (e.webhook_id, e.status, e.outcome) for e in session.scalars(select(WebhookEvent))
            ),
        }


def dump(database_url: str) -> str:
    """`pg_dump` of the whole database, as text: everything the product keeps."""
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    return subprocess.run(
        [
            PG_DUMP,
            "--data-only",
            "-h",
            url.host or "127.0.0.1",
            "-p",
            str(url.port or 5432),
            "-U",
            url.username or "postgres",
            url.database or "",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout


# A bytea value in pg_dump's COPY text: `\\x` and its bytes in hex.
_BYTEA = re.compile(r"\\{1,2}x((?:[0-9a-f]{2})+)")


def found_in(dumped: str, secret: str) -> bool:
    """The string in the dump as text, or in a bytea column (raw bodies), decoded. A secret
    of digits only (the zipcode, a card's last four) counts where no digit touches it: its
    digits also stand by chance in the microseconds of a timestamp (`06:01:15.101153`, a
    false alarm of the pipeline test) or inside a longer number, which are not the
    customer's."""
    text = _BYTEA.sub(lambda m: bytes.fromhex(m.group(1)).decode("utf-8", "replace"), dumped)
    if secret.isdigit():
        return re.search(rf"(?<!\d){secret}(?!\d)", text) is not None
    return secret in text


def every_table_as_text(engine: Engine) -> str:
    """Every row of every table, bytea decoded: the dump's check, not relying on its format."""
    return "\n".join(every_row(engine))


def every_row(engine: Engine) -> list[str]:
    """Each row of each table as one line of text (bytea decoded), prefixed by its table."""
    out = []
    with engine.connect() as conn:
        tables = conn.execute(
            text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        ).scalars()
        for table in list(tables):
            for row in conn.execute(text(f'SELECT * FROM "{table}"')):
                cells = [
                    bytes(value).decode("utf-8", errors="replace")
                    if isinstance(value, bytes | memoryview)
                    else json.dumps(value, default=str, ensure_ascii=False)
                    for value in row
                ]
                out.append(f"{table}: " + " | ".join(cells))
    return sorted(out)
