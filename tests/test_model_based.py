"""Final state equals the reference model's, whatever the arrival order and duplicates.

The generator makes realistic lifecycles; the deliveries are shuffled and a fifth of them
sent twice. The fast variant applies them with direct handler calls on PostgreSQL for many
seeds; the slow one sends them through the real pipeline — gunicorn ingest, Redis, two
celery worker processes, PostgreSQL — and reads the answers from the HTTP API.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import requests
from flask.testing import FlaskClient
from sqlalchemy import Engine, func, select

from cli.main import main
from ingest import create_app
from shared.db import make_sessionmaker, transaction
from shared.models import EventStatus, WebhookEvent
from shared.settings import Settings
from tests.fake_dodo import fake_dodo
from tests.lifecycles import generate, with_duplicates
from tests.reference import (
    IDENTITY,
    LEDGER_TYPES,
    ROUTE,
    Expected,
    Sent,
    chain_order,
    differences,
    expected_state,
    family_of,
)
from tests.support import (
    ADMIN_TOKEN,
    OUT_SECRET,
    Receiver,
    celery_worker,
    gunicorn,
    signed_headers,
    stored_event,
    wait_until,
)
from tests.test_outbound import check_receiver_got_every_change_in_order, wait_drained
from workers.handlers import ROUTES, Delivery
from workers.schemas import parse_event

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
DUPLICATE_RATIO = 0.2

Get = Callable[[str], tuple[int, Any]]


def api_differences(get: Get, expected: Expected) -> list[str]:
    """Ask the read API about every entity the reference knows; list what differs."""
    problems: list[str] = []
    for family, records in expected.records.items():
        for key, record in records.items():
            path = f"/api/{ROUTE[family]}/{key}"
            status, body = get(path)
            if status != 200:
                problems.append(f"{path}: HTTP {status}")
                continue
            problems += differences(record, body, path)
    for customer, accounts in expected.credits.items():
        path = f"/api/customers/{customer}/credits"
        status, body = get(path)
        problems += [f"{path}: HTTP {status}"] if status != 200 else []
        problems += differences(accounts, body, path) if status == 200 else []
    for (customer, entitlement), ledger in expected.ledgers.items():
        path = f"/api/customers/{customer}/credits/{entitlement}/ledger"
        status, body = get(path)
        problems += [f"{path}: HTTP {status}"] if status != 200 else []
        problems += differences(ledger, body, path) if status == 200 else []
    return problems


def all_changes(get: Get) -> list[dict[str, Any]]:
    """The whole feed, paged as a reader does with `after=next_after`."""
    changes: list[dict[str, Any]] = []
    after = 0
    while True:
        status, page = get(f"/api/changes?after={after}&limit=1000")
        assert status == 200, page
        changes += page["changes"]
        if not page["changes"]:
            return changes
        after = page["next_after"]


def current_view(get: Get, kind: str, entity_id: str) -> Any:
    """The record as the API returns it now, without `last_event` and `history`."""
    if kind == "credit_balance":
        customer, entitlement = entity_id.split(":", 1)
        _, items = get(f"/api/customers/{customer}/credits")
        return next(i for i in items if i["credit_entitlement_id"] == entitlement)
    _, record = get(f"/api/{ROUTE[f'{kind}s']}/{entity_id}")
    record.pop("last_event", None)
    record.pop("history", None)
    return record


def feed_differences(get: Get, outcomes: dict[str, str | None]) -> list[str]:
    """Per entity the feed is a chain ending in the API's record; no change from a
    superseded event, none twice from one event."""
    problems: list[str] = []
    by_entity: dict[tuple[str, str], list[dict[str, Any]]] = {}
    changes = all_changes(get)
    for change in changes:
        by_entity.setdefault((change["kind"], change["entity_id"]), []).append(change)
    seqs = [c["seq"] for c in changes]
    if seqs != sorted(set(seqs)):
        problems.append("feed: seqs not strictly increasing")
    for (kind, entity_id), chain in by_entity.items():
        where = f"feed {kind} {entity_id}"
        if chain[0]["before"] is not None:
            problems.append(f"{where}: first change has a before")
        for previous, change in pairwise(chain):
            if change["before"] != previous["after"]:
                problems.append(f"{where}: seq {change['seq']} does not follow on")
        for change in chain:
            if change["before"] == change["after"] or not change["changed"]:
                problems.append(f"{where}: seq {change['seq']} changes nothing")
        causes = [c["cause"]["webhook_id"] for c in chain]
        if len(causes) != len(set(causes)):
            problems.append(f"{where}: one event caused two changes")
        if chain[-1]["after"] != current_view(get, kind, entity_id):
            problems.append(f"{where}: last after is not the API's record")
    for change in changes:
        cause = change["cause"]["webhook_id"]
        if outcomes.get(cause) != "applied":
            problems.append(f"feed: change caused by {cause}, {outcomes.get(cause)}")
    return problems


def event_outcomes(engine: Engine) -> dict[str, str | None]:
    with engine.connect() as conn:
        rows = conn.execute(select(WebhookEvent.webhook_id, WebhookEvent.outcome)).all()
    return {webhook_id: outcome for webhook_id, outcome in rows}


def apply_directly(engine: Engine, deliveries: list[Sent]) -> dict[str, str | None]:
    """The worker's path without the queue: each webhook-id applied once, in arrival order;
    each one's outcome."""
    factory = make_sessionmaker(engine)
    seen: set[str] = set()
    outcomes: dict[str, str | None] = {}
    for sent in deliveries:
        if sent.webhook_id in seen:
            continue  # the durable record's job: one delivery id, one application
        seen.add(sent.webhook_id)
        handler = ROUTES.get(sent.type)
        event = parse_event(sent.type, sent.body.encode()) if handler else None
        if handler is None or event is None:
            continue
        with transaction(factory) as session:
            delivery = Delivery(sent.webhook_id, sent.webhook_ts, sent.timestamp)
            outcomes[sent.webhook_id] = str(handler(session, event, delivery))
    return outcomes


@pytest.fixture
def client(settings: Settings) -> Iterator[FlaskClient]:
    app = create_app(settings)
    yield app.test_client()
    app.extensions["dodo"].close()


class TestDirectHandlersAgainstReference:
    @pytest.mark.parametrize("seed", range(6))
    def test_shuffled_deliveries_with_duplicates_end_in_the_reference_state(
        self, seed: int, client: FlaskClient, clean_db: Engine
    ) -> None:
        rng = random.Random(1000 + seed)
        world = generate(seed, target=200, now=int(time.time()))
        deliveries = with_duplicates(world.events, DUPLICATE_RATIO, rng)
        outcomes = apply_directly(clean_db, deliveries)

        def get(path: str) -> tuple[int, Any]:
            answer = client.get(path, headers=AUTH)
            return answer.status_code, answer.json

        problems = api_differences(get, expected_state(world.events))
        assert problems == [], "\n".join(problems[:30])
        problems = feed_differences(get, outcomes)
        assert problems == [], "\n".join(problems[:30])


def final_counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(WebhookEvent.status, func.count()).group_by(WebhookEvent.status)
        ).all()
    return {str(status): int(count) for status, count in rows}


@pytest.mark.slow
class TestPipelineAgainstReference:
    def test_events_through_ingest_redis_and_two_workers_end_in_the_reference_state(
        self, env: dict[str, str], tmp_path: Path, clean_db: Engine, receiver: Receiver
    ) -> None:
        """≥1,000 events, 20% re-sent, shuffled, sent concurrently; the API must agree, the
        feed must chain per entity, and the receiver must get every change in order."""
        env = {**env, "OUTBOUND_WEBHOOK_URL": receiver.url, "OUTBOUND_WEBHOOK_SECRET": OUT_SECRET}
        seed = int(os.environ.get("MODEL_SEED", "20260301"))
        rng = random.Random(seed)
        world = generate(seed, target=1000, now=int(time.time()))
        unique = len(world.events)
        deliveries = with_duplicates(world.events, DUPLICATE_RATIO, rng)
        local = threading.local()

        def send(url: str, sent: Sent) -> int:
            if not hasattr(local, "http"):
                local.http = requests.Session()
            headers = signed_headers(
                sent.body,
                webhook_id=sent.webhook_id,
                at=datetime.fromtimestamp(sent.webhook_ts, UTC),
            )
            answer = local.http.post(f"{url}/webhooks/dodo", data=sent.body, headers=headers)
            return int(answer.status_code)

        with (
            gunicorn(env, tmp_path, workers=2) as url,
            celery_worker(env, tmp_path, name="model1") as worker1,
            celery_worker(env, tmp_path, name="model2") as worker2,
        ):
            started = time.monotonic()
            with ThreadPoolExecutor(max_workers=8) as pool:
                codes = list(pool.map(lambda sent: send(url, sent), deliveries))
            sent_at = time.monotonic()
            assert codes.count(202) == unique
            assert codes.count(200) == len(deliveries) - unique

            def drained() -> bool:
                counts = final_counts(clean_db)
                done = counts.get(EventStatus.PROCESSED, 0) + counts.get(EventStatus.IGNORED, 0)
                return done + counts.get(EventStatus.DEAD, 0) == unique

            wait_until(drained, timeout=180, interval=0.25, what="every event final")
            drained_at = time.monotonic()
            counts = final_counts(clean_db)
            assert counts.get(EventStatus.DEAD, 0) == 0, dead_reasons(clean_db)

            http = requests.Session()

            def get(path: str) -> tuple[int, Any]:
                answer = http.get(f"{url}{path}", headers=AUTH, timeout=10)
                return answer.status_code, answer.json()

            expected = expected_state(world.events)
            problems = api_differences(get, expected)
            compared = time.monotonic()
            problems += feed_differences(get, event_outcomes(clean_db))
            wait_drained(clean_db, timeout=180)
            delivered_at = time.monotonic()
            logs = [worker1.output(), worker2.output()]

        applied_by_worker = [log.count('"step": "processed"') for log in logs]
        retries = sum(log.count('"step": "retry"') for log in logs)

        figures = {
            "unique_events": unique,
            "deliveries": len(deliveries),
            "duplicates": len(deliveries) - unique,
            "entries_resent_under_new_id": world.entries_resent_under_new_id,
            "missing_ledger_entries": world.missing_entries,
            "timestamp_ties": world.ties,
            "statuses": counts,
            "processed_by_worker": applied_by_worker,
            "retries": retries,
            "send_seconds": round(sent_at - started, 2),
            "drain_seconds": round(drained_at - started, 2),
            "compare_seconds": round(compared - drained_at, 2),
            "changes_delivered_seconds": round(delivered_at - started, 2),
            "entities_compared": sum(len(r) for r in expected.records.values())
            + len(expected.ledgers),
        }
        print("model-based figures:", json.dumps(figures))
        (tmp_path / "figures.json").write_text(json.dumps(figures))
        assert problems == [], "\n".join(problems[:30])
        assert all(applied_by_worker), "both worker processes must have applied events"
        check_receiver_got_every_change_in_order(clean_db, receiver)


def dead_reasons(engine: Engine) -> str:
    with engine.connect() as conn:
        rows = conn.execute(
            select(WebhookEvent.type, WebhookEvent.last_error)
            .where(WebhookEvent.status == EventStatus.DEAD)
            .limit(10)
        ).all()
    return "\n".join(f"{t}: {e}" for t, e in rows)


# Some events are never delivered (an outage longer than Dodo's day of retries): the
# reconciliation against a fake Dodo API holding the objects' final state fills them in.
UNDELIVERED_RATIO = 0.15


def dodo_holds(events: list[Sent]) -> dict[str, Any]:
    """What Dodo's API lists once every event happened: each object's latest state, every
    ledger entry, each account's balance (the fake Dodo API's state)."""
    latest: dict[tuple[str, str], Sent] = {}
    entries: dict[str, dict[str, Any]] = {}
    for sent in sorted({s.webhook_id: s for s in events}.values(), key=lambda s: s.order_key):
        family = family_of(sent.type)
        if family is not None:
            latest[(family, str(sent.data[IDENTITY[family]]))] = sent
        elif sent.type in LEDGER_TYPES:
            entries.setdefault(sent.data["id"], sent.data)
    state: dict[str, Any] = {family: [] for family in IDENTITY}
    for (family, _), sent in latest.items():
        state[family].append({"created_at": sent.timestamp.isoformat(), **sent.data})
    state["ledger"] = list(entries.values())
    accounts: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for entry in entries.values():
        accounts.setdefault((entry["credit_entitlement_id"], entry["customer_id"]), []).append(
            entry
        )
    state["credit_entitlements"] = [
        {"id": entitlement} for entitlement in sorted({e for e, _ in accounts})
    ]
    state["balances"] = []
    for (entitlement, customer), held in sorted(accounts.items()):
        newest = chain_order(held)[-1]
        state["balances"].append(
            {
                "credit_entitlement_id": entitlement,
                "customer_id": customer,
                "balance": newest["balance_after"],
                "overage": newest["overage_after"],
            }
        )
    return state


def without_provenance(expected: Expected) -> Expected:
    """The state only: which event brought it (`last_event`, `history`, a ledger entry's
    delivery) is the synthetic one for what reconciliation filled in."""
    records = {
        family: {
            key: {k: v for k, v in record.items() if k not in ("last_event", "history")}
            for key, record in items.items()
        }
        for family, items in expected.records.items()
    }
    return Expected(records=records, credits=expected.credits, ledgers=expected.ledgers)


class TestReconciliationFillsUndeliveredEvents:
    @pytest.mark.parametrize("seed", range(2))
    def test_events_never_delivered_are_filled_in_by_reconcile(
        self,
        seed: int,
        client: FlaskClient,
        clean_db: Engine,
        settings: Settings,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        rng = random.Random(2000 + seed)
        world = generate(seed, target=200, now=int(time.time()) - 3600)
        # Low-balance alerts have no API to read them back from: they are always delivered.
        delivered = [
            s
            for s in world.events
            if s.type == "credit.balance_low" or rng.random() >= UNDELIVERED_RATIO
        ]
        assert len(delivered) < len(world.events)
        apply_directly(clean_db, with_duplicates(delivered, DUPLICATE_RATIO, rng))

        with fake_dodo(tmp_path) as api:
            api.put_state(dodo_holds(world.events))
            monkeypatch.setenv("DATABASE_URL", settings.database_url)
            monkeypatch.setenv("REDIS_URL", settings.redis_url)
            monkeypatch.setenv("DODO_PAYMENTS_API_KEY", api.api_key)
            monkeypatch.setenv("DODO_PAYMENTS_BASE_URL", api.url)
            monkeypatch.setenv("RECONCILE_REQUESTS_PER_SECOND", "1000")
            code = main(["reconcile", "--json"])
            out, err = capsys.readouterr()
        assert code == 0, err + out
        assert json.loads(out)["totals"]["recorded"] > 0
        apply_directly(clean_db, recorded_by_reconcile(clean_db))

        def get(path: str) -> tuple[int, Any]:
            answer = client.get(path, headers=AUTH)
            return answer.status_code, answer.json

        expected = without_provenance(expected_state(world.events))
        answered = without_provenance_get(get)
        problems = api_differences(answered, expected)
        assert problems == [], "\n".join(problems[:30])


def recorded_by_reconcile(engine: Engine) -> list[Sent]:
    with engine.connect() as conn:
        ids = conn.execute(
            select(WebhookEvent.webhook_id).where(WebhookEvent.webhook_id.like("reconcile\\_%"))
        ).scalars()
        events = [stored_event(engine, webhook_id) for webhook_id in ids]
    return [Sent(e.webhook_id, e.webhook_ts, json.loads(e.body or b"")) for e in events]


def without_provenance_get(get: Get) -> Get:
    def answer(path: str) -> tuple[int, Any]:
        status, body = get(path)
        if isinstance(body, dict):
            body = {k: v for k, v in body.items() if k not in ("last_event", "history")}
        return status, body

    return answer
