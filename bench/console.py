"""How fast the operator console answers on a big inbox: 1 million events by default.

    python -m bench.console [--events N] [--repeat R]

Fills a database of its own with N events (1% dead, 0.5% pending, the rest processed or
ignored, spread over 30 days) and a read model of 200,000 payments, 50,000 subscriptions,
20,000 refunds and license keys, 5,000 disputes and 10,000 credit accounts of 10 entries;
starts the real ingest under gunicorn, signs in through the form, and times every console
page (R requests each: median and worst, milliseconds, measured by the client over HTTP).
Writes bench/results/console.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import create_engine, text

from bench import stack
from shared.models import Base
from tests.support import ADMIN_TOKEN, service_env

RESULTS = Path(__file__).resolve().parent / "results" / "console.json"
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')

TYPES = [
    "payment.succeeded",
    "payment.failed",
    "payment.processing",
    "subscription.active",
    "subscription.renewed",
    "subscription.updated",
    "subscription.on_hold",
    "refund.succeeded",
    "dispute.opened",
    "license_key.created",
    "credit.added",
    "credit.deducted",
]

FILL = [
    # The inbox: one row per delivery, oldest first, ~2.6 s apart for 1M over 30 days.
    """
    INSERT INTO webhook_events (webhook_id, type, status, outcome, attempts, last_error, body,
        headers, webhook_ts, event_at, received_at, enqueued_at, processed_at)
    SELECT 'msg_' || lpad(i::text, 8, '0'), t,
        CASE WHEN i % 100 = 0 THEN 'dead' WHEN i % 100 = 1 THEN 'ignored'
             WHEN i % 200 = 2 THEN 'pending' ELSE 'processed' END,
        CASE WHEN i % 100 > 2 THEN 'applied' END,
        CASE WHEN i % 100 = 0 THEN 8 ELSE 1 END,
        CASE WHEN i % 100 = 0 THEN 'OperationalError: could not serialize access' END,
        convert_to(json_build_object('business_id', 'bus_bench', 'type', t,
            'timestamp', at, 'data', json_build_object(
                'payment_id', 'pay_' || (i % 200000), 'subscription_id', 'sub_' || (i % 50000),
                'customer', json_build_object('customer_id', 'cus_' || (i % 50000),
                    'email', 'c' || (i % 50000) || '@example.com', 'name', 'Customer'))
            )::text, 'UTF8'),
        json_build_object('webhook-id', 'msg_' || i, 'webhook-timestamp',
            extract(epoch FROM at)::bigint, 'webhook-signature', 'v1,bench'),
        extract(epoch FROM at)::bigint, at, at, at, at + interval '40 ms'
    FROM (
        SELECT i, now() - (CAST(:n AS int) - i) * (interval '30 days' / CAST(:n AS int)) AS at,
            CASE WHEN i % 1000 = 7 THEN 'credit.balance_low'
                 ELSE (CAST(:types AS text[]))[1 + i % cardinality(CAST(:types AS text[]))] END AS t
        FROM generate_series(1, CAST(:n AS int)) AS i
    ) AS s
    """,
    """
    INSERT INTO payments (payment_id, status, total_amount, currency, customer_id,
        subscription_id, refund_status, last_event_type, last_event_at, last_webhook_ts,
        last_webhook_id, data, updated_at)
    SELECT 'pay_' || i, 'succeeded', 1000 + i % 5000, 'USD', 'cus_' || (i % 50000),
        'sub_' || (i % 50000), NULL, 'payment.succeeded', now() - i * interval '10 s',
        0, 'msg_' || lpad((i * 5)::text, 8, '0'),
        json_build_object('payment_id', 'pay_' || i, 'customer',
            json_build_object('customer_id', 'cus_' || (i % 50000), 'name', 'Customer')),
        now()
    FROM generate_series(1, 200000) AS i
    """,
    """
    INSERT INTO subscriptions (subscription_id, status, product_id, quantity, customer_id,
        next_billing_date, previous_billing_date, cancel_at_next_billing_date, cancelled_at,
        last_event_type, last_event_at, last_webhook_ts, last_webhook_id, data, updated_at)
    SELECT 'sub_' || i, 'active', 'prod_' || (i % 20), 1, 'cus_' || i,
        now() + interval '20 days', now() - interval '10 days', false, NULL,
        'subscription.renewed', now() - i * interval '30 s', 0,
        'msg_' || lpad((i * 7)::text, 8, '0'), '{}'::json, now()
    FROM generate_series(0, 49999) AS i
    """,
    """
    INSERT INTO subscription_history (webhook_id, type, event_at, webhook_ts, subscription_id,
        status, product_id, quantity)
    SELECT 'msg_sh_' || i || '_' || k, 'subscription.renewed', now() - k * interval '30 days',
        0, 'sub_' || i, 'active', 'prod_' || (i % 20), 1
    FROM generate_series(0, 49999) AS i, generate_series(1, 3) AS k
    """,
    """
    INSERT INTO refunds (refund_id, payment_id, status, amount, currency, last_event_type,
        last_event_at, last_webhook_ts, last_webhook_id, data, updated_at)
    SELECT 'ref_' || i, 'pay_' || (i * 10), 'succeeded', 500, 'USD', 'refund.succeeded',
        now() - i * interval '60 s', 0, 'msg_r' || i, '{}'::json, now()
    FROM generate_series(1, 20000) AS i
    """,
    """
    INSERT INTO disputes (dispute_id, payment_id, dispute_status, dispute_stage, amount,
        currency, last_event_type, last_event_at, last_webhook_ts, last_webhook_id, data,
        updated_at)
    SELECT 'dis_' || i, 'pay_' || (i * 40), 'dispute_won', 'dispute', 10.50, 'USD',
        'dispute.won', now() - i * interval '120 s', 0, 'msg_d' || i, '{}'::json, now()
    FROM generate_series(1, 5000) AS i
    """,
    """
    INSERT INTO dispute_history (webhook_id, type, event_at, webhook_ts, dispute_id,
        dispute_status, dispute_stage)
    SELECT 'msg_dh_' || i || '_' || k, 'dispute.opened', now() - k * interval '1 day', 0,
        'dis_' || i, 'dispute_opened', 'dispute'
    FROM generate_series(1, 5000) AS i, generate_series(1, 3) AS k
    """,
    """
    INSERT INTO license_keys (id, key, status, customer_id, product_id, expires_at,
        last_event_type, last_event_at, last_webhook_ts, last_webhook_id, data, updated_at)
    SELECT 'lic_' || i, 'KEY-' || i, 'active', 'cus_' || (i * 2), 'prod_1', NULL,
        'license_key.created', now() - i * interval '60 s', 0, 'msg_l' || i, '{}'::json, now()
    FROM generate_series(1, 20000) AS i
    """,
    """
    INSERT INTO credit_entries (id, customer_id, credit_entitlement_id, transaction_type,
        event_type, is_credit, amount, balance_before, balance_after, overage_before,
        overage_after, created_at, webhook_id, data)
    SELECT 'cre_' || a || '_' || k, 'cus_' || a, 'ent_1', 'credit_added', 'credit.added', true,
        10, 10 * k, 10 * (k + 1), 0, 0, now() - (10 - k) * interval '1 day',
        'msg_c' || a || '_' || k, '{}'::json
    FROM generate_series(0, 9999) AS a, generate_series(0, 9) AS k
    """,
    """
    INSERT INTO credit_balances (customer_id, credit_entitlement_id, balance, overage,
        chain_ok, last_entry_at, last_entry_id, entry_count, updated_at)
    SELECT 'cus_' || a, 'ent_1', 100, 0, true, now() - interval '1 day', 'cre_' || a || '_9',
        10, now()
    FROM generate_series(0, 9999) AS a
    """,
]


def fill(url: str, n: int) -> float:
    started = time.monotonic()
    engine = create_engine(url)
    with engine.begin() as conn:
        for statement in FILL:
            conn.execute(text(statement), {"n": n, "types": TYPES})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for table in Base.metadata.sorted_tables:
            conn.execute(text(f"VACUUM ANALYZE {table.name}"))
    engine.dispose()
    return time.monotonic() - started


def pages(n: int) -> list[tuple[str, str, dict[str, str] | None]]:
    middle = f"msg_{n // 2:08d}"
    return [
        ("Overview", "/console/", None),
        ("Events, first page", "/console/events", None),
        ("Events, status=dead", "/console/events?status=dead", None),
        ("Events, type=subscription.*", "/console/events?type=subscription.*", None),
        ("Events, rare type (1 in 1,000)", "/console/events?type=credit.balance_low", None),
        ("Events, processed since 2d", "/console/events?status=processed&since=2d", None),
        ("Events, a page half-way down", "CURSOR", None),
        ("An event", f"/console/events/{middle}", None),
        ("Dead letters", "/console/dead-letters", None),
        ("Dead letters, type=payment.*", "/console/dead-letters?type=payment.*", None),
        (
            "Retry: the dry-run count of payment.*",
            "/console/dead-letters/retry",
            {"scope": "matching", "type": "payment.*"},
        ),
        ("A payment", "/console/payments/pay_4242", None),
        ("A subscription (with history)", "/console/subscriptions/sub_4242", None),
        ("A dispute (with history)", "/console/disputes/dis_42", None),
        ("A customer", "/console/customers/cus_4242", None),
        ("Customers", "/console/customers", None),
        ("Search a payment id", "/console/search?q=pay_4242", None),
        ("Search a customer id", "/console/search?q=cus_4242", None),
        ("Search an unknown id", "/console/search?q=nothing_here", None),
        ("Changes", "/console/changes", None),
    ]


def signed_in(base: str) -> tuple[requests.Session, str]:
    browser = requests.Session()
    token = CSRF.search(browser.get(f"{base}/console/login", timeout=30).text)
    assert token
    answer = browser.post(
        f"{base}/console/login",
        data={"token": ADMIN_TOKEN, "csrf_token": token.group(1)},
        timeout=30,
        allow_redirects=False,
    )
    assert answer.status_code == 302, answer.text
    page_token = CSRF.search(browser.get(f"{base}/console/", timeout=30).text)
    assert page_token
    return browser, page_token.group(1)


def half_way_cursor(browser: requests.Session, base: str, url: str) -> str:
    from ingest.console.queries import Cursor

    engine = create_engine(url)
    with engine.connect() as conn:
        at, webhook_id = conn.execute(
            text(
                "SELECT received_at, webhook_id FROM webhook_events ORDER BY received_at "
                "OFFSET (SELECT count(*) / 2 FROM webhook_events) LIMIT 1"
            )
        ).one()
    engine.dispose()
    return f"/console/events?before={Cursor(at, webhook_id).encode()}"


def measure(base: str, url: str, n: int, repeat: int) -> list[dict[str, Any]]:
    browser, token = signed_in(base)
    rows = []
    for name, path, form in pages(n):
        if path == "CURSOR":
            path = half_way_cursor(browser, base, url)
        times = []
        status = 0
        for _ in range(repeat):
            started = time.perf_counter()
            if form is None:
                answer = browser.get(base + path, timeout=60, allow_redirects=False)
            else:
                answer = browser.post(base + path, data={**form, "csrf_token": token}, timeout=60)
            times.append((time.perf_counter() - started) * 1000)
            status = answer.status_code
        rows.append(
            {
                "page": name,
                "path": path if len(path) < 70 else path[:67] + "...",
                "status": status,
                "median_ms": round(statistics.median(times), 1),
                "max_ms": round(max(times), 1),
            }
        )
        print(f"  {name:<40} {status}  {rows[-1]['median_ms']:>7} ms  (worst {rows[-1]['max_ms']})")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument(
        "--without-keyset-index",
        action="store_true",
        help="drop migration 0002_console's index first, to see what it is worth",
    )
    parser.add_argument("--out", type=Path, help="where to write the results (JSON)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-console-") as tmp:
        logs = Path(tmp)
        with stack.bench_database() as url, stack.redis_server(logs) as redis_url:
            print(f"bench.console: filling {args.events:,} events and the read model …")
            seconds = fill(url, args.events)
            print(f"  filled in {seconds:.0f}s")
            if args.without_keyset_index:
                engine = create_engine(url)
                with engine.begin() as conn:
                    conn.execute(text("DROP INDEX ix_webhook_events_received_at_webhook_id"))
                engine.dispose()
            env = service_env(url, redis_url, LOG_LEVEL="WARNING")
            with stack.gunicorn("ingest:create_app()", env, logs, "console", workers=2) as proc:
                base = f"http://127.0.0.1:{proc.port}"  # type: ignore[attr-defined]
                rows = measure(base, url, args.events, args.repeat)
    result = {
        "events": args.events,
        "repeat": args.repeat,
        "gunicorn_workers": 2,
        "keyset_index": not args.without_keyset_index,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "pages": rows,
    }
    target = args.out or (
        RESULTS.with_name("console-without-index.json") if args.without_keyset_index else RESULTS
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=2) + "\n")
    print(f"bench.console: wrote {target}")
    expected = {"Search a payment id": 302, "Search a customer id": 302}
    expected["Search an unknown id"] = 404
    wrong = [r["page"] for r in rows if r["status"] != expected.get(r["page"], 200)]
    if wrong:
        print(f"bench.console: unexpected status on {', '.join(wrong)}")
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
