"""Mixed, distinct Dodo events, and deliveries pre-signed for a load generator to replay."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path

from standardwebhooks.webhooks import Webhook

from cli.samples import sample_event
from shared.catalog import HANDLED_TYPES, KNOWN_OTHER

# The identity field of each family's `data`, made distinct per event so every event touches
# its own row (DESIGN.md's table).
_IDENTITY = {
    "payment": "payment_id",
    "refund": "refund_id",
    "dispute": "dispute_id",
    "subscription": "subscription_id",
    "license_key": "id",
    "credit": "id",
}
MARK = "__BENCH__"
CUSTOMERS = 50


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


def event_mix(n: int) -> list[str]:
    """Event types in a fixed rotation: the 30 handled types, and 1 in 10 an SDK-known other."""
    types: list[str] = []
    for i in range(n):
        if i % 10 == 9:
            types.append(KNOWN_OTHER[(i // 10) % len(KNOWN_OTHER)])
        else:
            types.append(HANDLED_TYPES[(i - i // 10) % len(HANDLED_TYPES)])
    return types


@cache
def _template(event_type: str) -> str:
    """The sample envelope as JSON, with MARK where a distinct value goes in."""
    event = sample_event(event_type, timestamp=datetime(2026, 1, 1, tzinfo=UTC))
    event["timestamp"] = MARK + "ts"
    field = _IDENTITY.get(event_type.split(".")[0])
    if field and field in event["data"]:
        event["data"][field] = f"{event['data'][field]}_{MARK}"
    if event_type.startswith(("refund.", "dispute.")):
        # Refunds and disputes point at a payment of the same run.
        event["data"]["payment_id"] = f"pay_sample0001_{MARK}pay"
    text = json.dumps(event, separators=(",", ":"))
    # Every date the sample carries is the event's own; customers spread over a small pool.
    text = text.replace("2026-01-01T00:00:00+00:00", MARK + "ts")
    return text.replace('"cus_sample0001"', f'"cus_{MARK}cus"')


def event_body(
    event_type: str, serial: str, occurred: datetime, *, payment: str, customer: str
) -> bytes:
    body = _template(event_type)
    body = body.replace(MARK + "ts", occurred.isoformat().replace("+00:00", "Z"))
    body = body.replace(MARK + "pay", payment).replace(MARK + "cus", customer)
    return body.replace(MARK, serial).encode()


@dataclass(frozen=True)
class Delivery:
    webhook_id: str
    event_type: str
    body: bytes
    headers: dict[str, str]
    webhook_ts: int
    occurred: datetime


def signed_deliveries(n: int, secret: str, *, run: str) -> Iterator[Delivery]:
    """n deliveries with distinct webhook ids, signed now (the window is ±5 minutes)."""
    webhook = Webhook(secret)
    now = datetime.now(UTC)
    payment = f"{run}_none"
    for i, event_type in enumerate(event_mix(n)):
        serial = f"{run}_{i}"
        if event_type.startswith("payment."):
            payment = serial
        occurred = now - timedelta(seconds=60) + timedelta(microseconds=i)
        customer = f"bench{i % CUSTOMERS}"
        body = event_body(event_type, serial, occurred, payment=payment, customer=customer)
        webhook_id = f"msg_{serial}"
        headers = {
            "webhook-id": webhook_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": webhook.sign(webhook_id, now, body.decode()),
        }
        yield Delivery(webhook_id, event_type, body, headers, int(now.timestamp()), occurred)


def raw_request(delivery: Delivery, host: str) -> bytes:
    head = [
        "POST /webhooks/dodo HTTP/1.1",
        f"Host: {host}",
        "Content-Type: application/json",
        f"Content-Length: {len(delivery.body)}",
        *(f"{name}: {value}" for name, value in delivery.headers.items()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + delivery.body


def write_requests(path: Path, n: int, secret: str, *, host: str, run: str, parts: int) -> None:
    """`path.0` … `path.<parts-1>`: raw HTTP requests separated by NUL, one file per wrk thread."""
    with ExitStack() as stack:
        files = [stack.enter_context(Path(f"{path}.{k}").open("wb")) for k in range(parts)]
        for i, delivery in enumerate(signed_deliveries(n, secret, run=run)):
            files[i % parts].write(raw_request(delivery, host) + b"\0")


def read_requests(path: Path) -> list[bytes]:
    requests: list[bytes] = []
    k = 0
    while Path(f"{path}.{k}").exists():
        requests += [r for r in Path(f"{path}.{k}").read_bytes().split(b"\0") if r]
        k += 1
    return requests
