"""Screenshots of every console page for docs/console/, from a demo stack of its own.

    python -m bench.console_screenshots [--out docs/console]

Starts a database, redis-server, the ingest under gunicorn and a Celery worker, sends ~80
signed sample events (Dodo's SDK models, `cli.samples`) through POST /webhooks/dodo — a
customer's payments, subscription, refund, dispute, license key and credit ledger, and a few
bodies that fail validation and go dead — then sets their `received_at` to when they
occurred, over the last 20 hours (so the overview's chart has bars; the only edit to what
the pipeline wrote) and takes
each page in headless Chromium, the browser setup of tests/console/test_browser.py.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import requests
from playwright.sync_api import sync_playwright
from sqlalchemy import create_engine, text

from bench import stack
from cli.samples import sample_event
from tests.browser import launch_chromium
from tests.support import ADMIN_TOKEN, service_env, signed_headers, wait_until

ROOT = Path(__file__).resolve().parent.parent
CUSTOMER = {"customer_id": "cus_demo1", "email": "ada@example.com", "name": "Ada Lovelace"}


def body(event_type: str, when: datetime, **data: Any) -> dict[str, Any]:
    return sample_event(
        event_type, timestamp=when, overrides={f"data.{k}": v for k, v in data.items()}
    )


def demo_events() -> list[dict[str, Any]]:
    t0 = datetime.now(UTC) - timedelta(hours=20)
    at = lambda minutes: t0 + timedelta(minutes=minutes)  # noqa: E731
    events = [
        body("subscription.active", at(0), subscription_id="sub_demo1", customer=CUSTOMER),
        body(
            "payment.succeeded",
            at(1),
            payment_id="pay_demo1",
            subscription_id="sub_demo1",
            total_amount=4900,
            customer=CUSTOMER,
        ),
        body("subscription.renewed", at(300), subscription_id="sub_demo1", customer=CUSTOMER),
        body(
            "payment.succeeded",
            at(301),
            payment_id="pay_demo2",
            subscription_id="sub_demo1",
            total_amount=4900,
            customer=CUSTOMER,
        ),
        body(
            "refund.succeeded",
            at(400),
            refund_id="ref_demo1",
            payment_id="pay_demo2",
            amount=4900,
            customer=CUSTOMER,
        ),
        body(
            "dispute.opened",
            at(500),
            dispute_id="dis_demo1",
            payment_id="pay_demo1",
            amount="49.00",
            customer=CUSTOMER,
        ),
        body(
            "dispute.challenged",
            at(600),
            dispute_id="dis_demo1",
            payment_id="pay_demo1",
            amount="49.00",
            customer=CUSTOMER,
        ),
        body(
            "dispute.won",
            at(900),
            dispute_id="dis_demo1",
            payment_id="pay_demo1",
            amount="49.00",
            customer=CUSTOMER,
        ),
        body("license_key.created", at(2), id="lic_demo1", customer_id="cus_demo1"),
    ]
    balance = 0
    for n, (kind, amount) in enumerate(
        [
            ("credit.added", 500),
            ("credit.deducted", 120),
            ("credit.deducted", 80),
            ("credit.added", 200),
        ]
    ):
        after = balance + amount if kind == "credit.added" else balance - amount
        events.append(
            body(
                kind,
                at(10 + n * 200),
                id=f"cre_demo{n}",
                customer_id="cus_demo1",
                credit_entitlement_id="ent_api_calls",
                amount=f"{amount}.00",
                balance_before=f"{balance}.00",
                balance_after=f"{after}.00",
                overage_before="0.00",
                overage_after="0.00",
                created_at=at(10 + n * 200).isoformat(),
            )
        )
        balance = after
    rng = random.Random(7)
    for n in range(60):
        kind = rng.choice(["payment.succeeded", "payment.failed", "subscription.renewed"])
        customer = {**CUSTOMER, "customer_id": f"cus_{1000 + n % 25}", "name": f"Customer {n}"}
        key = "payment_id" if kind.startswith("payment") else "subscription_id"
        events.append(
            body(
                kind, at(rng.uniform(0, 1150)), **{key: f"{key[:3]}_{5000 + n}"}, customer=customer
            )
        )
    for n in range(6):
        broken = body("subscription.on_hold", at(700 + n * 60), subscription_id=f"sub_bad{n}")
        del broken["data"]["status"]  # fails validation: dead at once, with the reason
        events.append(broken)
    return events


def send(base: str, events: list[dict[str, Any]]) -> list[str]:
    ids = []
    for event in events:
        webhook_id = f"msg_{uuid.uuid4().hex[:20]}"
        raw = json.dumps(event)
        answer = requests.post(
            f"{base}/webhooks/dodo",
            data=raw,
            headers=signed_headers(raw, webhook_id=webhook_id),
            timeout=10,
        )
        assert answer.status_code in (200, 202), answer.text
        ids.append(webhook_id)
    return ids


def spread(url: str) -> None:
    """Received when they occurred: the demo's events happened over the last 20 hours."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE webhook_events SET received_at = event_at + random() * interval '2 s',"
                " processed_at = event_at + interval '2 s' + random() * interval '50 ms'"
                " WHERE event_at IS NOT NULL"
            )
        )
    engine.dispose()


def shoot(base: str, out: Path, dead_id: str) -> list[Path]:
    shots = [
        ("signin", "/console/login", None),
        ("overview", "/console/", None),
        ("events", "/console/events", None),
        ("event", None, "event"),
        ("dead-letters", "/console/dead-letters", None),
        ("retry-dry-run", None, "retry"),
        ("customer", "/console/customers/cus_demo1", None),
        ("dispute", "/console/disputes/dis_demo1", None),
        ("subscription", "/console/subscriptions/sub_demo1", None),
        ("changes", "/console/changes", None),
    ]
    written = []
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as driver:
        browser = launch_chromium(driver)
        page = browser.new_page(base_url=base, viewport={"width": 1280, "height": 860})
        page.goto("/console/login")
        page.screenshot(path=str(out / "signin.png"))
        written.append(out / "signin.png")
        page.get_by_label("Admin token").fill(ADMIN_TOKEN)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url("**/console/")
        for name, path, special in shots[1:]:
            if special == "event":
                page.goto("/console/payments/pay_demo1")
                page.get_by_role("link", name="msg_", exact=False).first.click()
            elif special == "retry":
                page.goto("/console/dead-letters")
                page.get_by_role("button", name="Retry all").click()
            else:
                assert path is not None
                page.goto(path)
            target = out / f"{name}.png"
            page.screenshot(path=str(target), full_page=name != "events")
            written.append(target)
            if special == "retry":
                page.get_by_role("button", name="Retry ", exact=False).last.click()
                page.wait_for_selector("#retry-result")
                page.screenshot(path=str(out / "retry-result.png"), full_page=True)
                written.append(out / "retry-result.png")
        browser.close()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "console")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="console-shots-") as tmp:
        logs = Path(tmp)
        with stack.bench_database() as url, stack.redis_server(logs) as redis_url:
            env = service_env(url, redis_url, MAX_ATTEMPTS="3")
            with (
                stack.gunicorn("ingest:create_app()", env, logs, "shots", workers=2) as web,
                stack.celery_worker("workers", 2, env, logs, "shots"),
            ):
                base = f"http://127.0.0.1:{web.port}"  # type: ignore[attr-defined]
                ids = send(base, demo_events())
                engine = create_engine(url)

                def settled() -> bool:
                    with engine.connect() as conn:
                        return not conn.execute(
                            text(
                                "SELECT count(*) FROM webhook_events WHERE status NOT IN"
                                " ('processed', 'ignored', 'dead')"
                            )
                        ).scalar()

                wait_until(settled, timeout=120, what="the demo events to settle")
                engine.dispose()
                spread(url)
                written = shoot(base, args.out, ids[-1])
    for path in written:
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
