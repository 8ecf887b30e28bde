"""A fake of Dodo's API for the reconciliation tests: a real HTTP server the official SDK talks
to through `DODO_PAYMENTS_BASE_URL`, run as a process of its own.

`python -m tests.fake_dodo --port P --api-key K` serves the list and retrieve routes
reconciliation uses, from objects the test puts there (`PUT /_fake/state`), built with the SDK's
own response models (`FakeDodo.payment(...)` ...). Pages are numbered from 0, as Dodo's are,
and `page_number` is capped (`--max-page`). Faults are queued (`POST /_fake/faults`): each of
the next API requests (of its `path` and `page`, if the fault names them) answers one (a 429 with
Retry-After, a 500, a 404). Every API request is logged (`GET /_fake/requests`).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests

from tests.support import VENV_BIN, ManagedProcess, free_port, wait_until

FAMILIES = ("payments", "refunds", "disputes", "subscriptions", "license_keys")
KEYS = {
    "payments": "payment_id",
    "refunds": "refund_id",
    "disputes": "dispute_id",
    "subscriptions": "subscription_id",
    "license_keys": "id",
}


def _list_fields() -> dict[str, set[str] | None]:
    """What each list route returns of the stored (retrieve) object; None: all of it."""
    from dodopayments.types import RefundListItem
    from dodopayments.types.dispute_list_response import DisputeListResponse

    return {
        "refunds": set(RefundListItem.model_fields),
        "disputes": set(DisputeListResponse.model_fields),
    }


class Store:
    """The objects, the fault queue and the request log; shared by the handler threads."""

    def __init__(self, api_key: str, max_page: int) -> None:
        self.api_key = api_key
        self.max_page = max_page
        self.lock = threading.Lock()
        self.state: dict[str, Any] = {}
        self.faults: list[dict[str, Any]] = []
        self.log: list[dict[str, Any]] = []
        self.list_fields = _list_fields()


def _when(value: str) -> datetime:
    when = datetime.fromisoformat(value)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _customer(obj: dict[str, Any]) -> str | None:
    customer = obj.get("customer")
    if isinstance(customer, dict):
        return customer.get("customer_id")
    return obj.get("customer_id")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    store: Store

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def _answer(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        length = int(self.headers.get("content-length") or 0)
        return json.loads(self.rfile.read(length) or b"null")

    # -- control ----------------------------------------------------------------------

    def do_PUT(self) -> None:
        if self.path == "/_fake/state":
            with self.store.lock:
                self.store.state = self._body()
            self._answer(200, {"ok": True})
            return
        self._answer(404, {"message": "no such control route"})

    def do_POST(self) -> None:
        if self.path == "/_fake/faults":
            with self.store.lock:
                self.store.faults.extend(self._body())
            self._answer(200, {"ok": True})
            return
        self._answer(405, {"message": "the fake only reads"})

    def do_DELETE(self) -> None:
        if self.path == "/_fake/requests":
            with self.store.lock:
                self.store.log.clear()
            self._answer(200, {"ok": True})
            return
        self._answer(404, {"message": "no such control route"})

    # -- the API ------------------------------------------------------------------------

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/_fake/requests":
            with self.store.lock:
                self._answer(200, list(self.store.log))
            return
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        status, body, headers = self._api(url.path, query)
        with self.store.lock:
            self.store.log.append(
                {"path": url.path, "query": query, "status": status, "at": time.time()}
            )
        self._answer(status, body, headers)

    def _api(self, path: str, query: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        if self.headers.get("authorization") != f"Bearer {self.store.api_key}":
            return 401, {"code": "UNAUTHORIZED", "message": "Invalid API key"}, {}
        with self.store.lock:
            fault = next(
                (
                    f
                    for f in self.store.faults
                    if f.get("path") in (None, path)
                    and f.get("page") in (None, query.get("page_number"))
                ),
                None,
            )
            if fault is not None:
                self.store.faults.remove(fault)
            state = self.store.state
        if fault is not None:
            headers = {"retry-after": str(fault["retry_after"])} if "retry_after" in fault else {}
            return int(fault["status"]), {"message": fault.get("message", "fault")}, headers
        parts = [p for p in path.split("/") if p]
        try:
            page = int(query.get("page_number", "0"))
            size = min(int(query.get("page_size", "10")), 100)
        except ValueError:
            return 422, {"message": "bad page"}, {}
        if page > self.store.max_page:
            return 422, {"message": f"page_number is capped at {self.store.max_page}"}, {}
        if len(parts) == 1 and parts[0] in FAMILIES:
            by_id = state.get("order") == "by_id"
            return self._list(parts[0], state.get(parts[0], []), query, page, size, by_id)
        if len(parts) == 2 and parts[0] in FAMILIES:
            key = KEYS[parts[0]]
            for obj in state.get(parts[0], []):
                if obj.get(key) == parts[1]:
                    return 200, obj, {}
            return 404, {"message": "not found"}, {}
        if parts == ["credit-entitlements"]:
            return 200, {"items": _page(state.get("credit_entitlements", []), page, size)}, {}
        if len(parts) == 3 and parts[0] == "credit-entitlements" and parts[2] == "balances":
            rows = [
                b
                for b in state.get("balances", [])
                if b["credit_entitlement_id"] == parts[1]
                and query.get("customer_id") in (None, b["customer_id"])
            ]
            return 200, {"items": _page(rows, page, size)}, {}
        if len(parts) == 5 and parts[0] == "credit-entitlements" and parts[4] == "ledger":
            rows = [
                e
                for e in state.get("ledger", [])
                if (e["credit_entitlement_id"], e["customer_id"]) == (parts[1], parts[3])
                and (
                    "start_date" not in query
                    or _when(e["created_at"]) >= _when(query["start_date"])
                )
            ]
            rows.sort(key=lambda e: (e["created_at"], e["id"]), reverse=True)
            return 200, {"items": _page(rows, page, size)}, {}
        return 404, {"message": f"no route {path}"}, {}

    def _list(
        self,
        family: str,
        objects: list[dict[str, Any]],
        query: dict[str, str],
        page: int,
        size: int,
        by_id: bool,
    ) -> tuple[int, Any, dict[str, str]]:
        """Newest first, as Dodo lists; by id instead when the state says `"order": "by_id"`."""
        rows = objects
        if "created_at_gte" in query:
            gte = _when(query["created_at_gte"])
            rows = [o for o in rows if _when(o["created_at"]) >= gte]
        if "created_at_lte" in query:
            lte = _when(query["created_at_lte"])
            rows = [o for o in rows if _when(o["created_at"]) <= lte]
        if "customer_id" in query:
            rows = [o for o in rows if _customer(o) == query["customer_id"]]
        if by_id:
            rows = sorted(rows, key=lambda o: str(o.get(KEYS[family])))
        else:
            rows = sorted(
                rows, key=lambda o: (o["created_at"], str(o.get(KEYS[family]))), reverse=True
            )
        fields = self.store.list_fields.get(family)
        items = _page(rows, page, size)
        if fields is not None:
            items = [{k: v for k, v in o.items() if k in fields} for o in items]
        return 200, {"items": items}, {}


def _page(rows: list[Any], page: int, size: int) -> list[Any]:
    return rows[page * size : (page + 1) * size]


def serve(port: int, api_key: str, max_page: int) -> None:
    handler = type("BoundHandler", (Handler,), {"store": Store(api_key, max_page)})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    print(f"fake dodo listening on {port}", flush=True)
    server.serve_forever()


# ---------------------------------------------------------------------------------------------
# The test side


class FakeDodo:
    """The test's handle on a running fake: its URL, its state, faults and request log."""

    def __init__(self, url: str, api_key: str) -> None:
        self.url = url
        self.api_key = api_key

    def put_state(self, state: dict[str, Any]) -> None:
        requests.put(f"{self.url}/_fake/state", json=state, timeout=30).raise_for_status()

    def fail_next(self, *faults: dict[str, Any]) -> None:
        requests.post(f"{self.url}/_fake/faults", json=list(faults), timeout=5).raise_for_status()

    def requests(self) -> list[dict[str, Any]]:
        answer = requests.get(f"{self.url}/_fake/requests", timeout=10)
        answer.raise_for_status()
        return list(answer.json())

    def clear_requests(self) -> None:
        requests.delete(f"{self.url}/_fake/requests", timeout=5).raise_for_status()


@contextmanager
def fake_dodo(
    log_dir: Path, *, api_key: str = "test-api-key", max_page: int = 50
) -> Iterator[FakeDodo]:
    port = free_port()
    proc = ManagedProcess(
        f"fake-dodo-{port}",
        [
            str(VENV_BIN / "python"),
            "-m",
            "tests.fake_dodo",
            "--port",
            str(port),
            "--api-key",
            api_key,
            "--max-page",
            str(max_page),
        ],
        {"PYTHONUNBUFFERED": "1"},
        log_dir,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: requests.get(f"{url}/_fake/requests", timeout=1).ok,
            timeout=30,
            what=f"the fake Dodo API; log:\n{proc.output()}",
        )
        yield FakeDodo(url, api_key)
    finally:
        proc.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--max-page", type=int, default=50)
    args = parser.parse_args(argv)
    serve(args.port, args.api_key, args.max_page)
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ---------------------------------------------------------------------------------------------
# Objects as Dodo's API returns them, built with the SDK's own response models


def _object(model_path: str, name: str, created_at: datetime, **fields: Any) -> dict[str, Any]:
    import importlib

    from cli.samples import sample_object

    model = getattr(importlib.import_module(model_path), name)
    return sample_object(model, now=created_at, created_at=created_at.isoformat(), **fields)


def _customer_ref(customer_id: str) -> dict[str, Any]:
    return {"customer_id": customer_id, "email": "someone@example.com", "name": "A Customer"}


def payment(
    payment_id: str,
    *,
    created_at: datetime,
    status: str = "succeeded",
    customer_id: str = "cus_1",
    **fields: Any,
) -> dict[str, Any]:
    return _object(
        "dodopayments.types",
        "PaymentListResponse",
        created_at,
        payment_id=payment_id,
        status=status,
        customer=_customer_ref(customer_id),
        **fields,
    )


def refund(
    refund_id: str,
    *,
    created_at: datetime,
    status: str = "succeeded",
    customer_id: str = "cus_1",
    **fields: Any,
) -> dict[str, Any]:
    return _object(
        "dodopayments.types",
        "Refund",
        created_at,
        refund_id=refund_id,
        status=status,
        customer=_customer_ref(customer_id),
        **fields,
    )


def dispute(
    dispute_id: str,
    *,
    created_at: datetime,
    dispute_status: str = "dispute_opened",
    customer_id: str = "cus_1",
    **fields: Any,
) -> dict[str, Any]:
    return _object(
        "dodopayments.types",
        "GetDispute",
        created_at,
        dispute_id=dispute_id,
        dispute_status=dispute_status,
        customer=_customer_ref(customer_id),
        **fields,
    )


def subscription(
    subscription_id: str,
    *,
    created_at: datetime,
    status: str = "active",
    customer_id: str = "cus_1",
    **fields: Any,
) -> dict[str, Any]:
    return _object(
        "dodopayments.types",
        "SubscriptionListResponse",
        created_at,
        subscription_id=subscription_id,
        status=status,
        customer=_customer_ref(customer_id),
        **fields,
    )


def license_key(
    key_id: str,
    *,
    created_at: datetime,
    status: str = "active",
    customer_id: str = "cus_1",
    **fields: Any,
) -> dict[str, Any]:
    return _object(
        "dodopayments.types",
        "LicenseKey",
        created_at,
        id=key_id,
        key=f"LK-{key_id}",
        status=status,
        customer_id=customer_id,
        **fields,
    )


def entitlement(entitlement_id: str, *, created_at: datetime) -> dict[str, Any]:
    return _object(
        "dodopayments.types",
        "CreditEntitlement",
        created_at,
        id=entitlement_id,
        updated_at=created_at.isoformat(),
    )


def balance(
    entitlement_id: str, customer_id: str, *, balance: str, overage: str = "0", at: datetime
) -> dict[str, Any]:
    return _object(
        "dodopayments.types.credit_entitlements",
        "CustomerCreditBalance",
        at,
        id=f"bal_{entitlement_id}_{customer_id}",
        credit_entitlement_id=entitlement_id,
        customer_id=customer_id,
        balance=balance,
        overage=overage,
        updated_at=at.isoformat(),
    )


def ledger(
    entitlement_id: str,
    customer_id: str,
    amounts: list[int],
    *,
    start: datetime,
    prefix: str = "cle",
) -> list[dict[str, Any]]:
    """A chain of entries from a zero balance, one a minute; positive amounts are credits."""
    from datetime import timedelta

    entries = []
    held = 0
    for number, amount in enumerate(amounts, start=1):
        after = held + amount
        entries.append(
            _object(
                "dodopayments.types.credit_entitlements",
                "CreditLedgerEntry",
                start + timedelta(minutes=number),
                id=f"{prefix}_{customer_id}_{number:04d}",
                credit_entitlement_id=entitlement_id,
                customer_id=customer_id,
                is_credit=amount > 0,
                transaction_type="credit_added" if amount > 0 else "credit_deducted",
                amount=str(abs(amount)),
                balance_before=str(held),
                balance_after=str(after),
                overage_before="0",
                overage_after="0",
            )
        )
        held = after
    return entries
