"""One outbound POST (workers/outbound.py `post_change`) against a local HTTP server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from shared.models import Change
from tests.support import OUT_SECRET
from workers.outbound import RESPONSE_HEAD_BYTES, post_change

seen: list[dict[str, Any]] = []


class Endpoint(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        seen.append({"path": self.path, "headers": dict(self.headers), "body": body})
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("location", "/elsewhere")
            self.send_header("content-length", "0")
            self.end_headers()
        elif self.path == "/big":
            payload = b"E" * 200_000
            self.send_response(500)
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        elif self.path == "/slow":
            time.sleep(2)
            self.send_response(204)
            self.end_headers()
        else:
            self.send_response(204)
            self.end_headers()


@pytest.fixture
def endpoint() -> Iterator[str]:
    seen.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(follow_redirects=False, trust_env=False) as own:
        yield own


def a_change() -> Change:
    moment = datetime(2026, 5, 1, 9, 0, tzinfo=UTC)
    return Change(
        seq=7,
        id="chg_abc",
        kind="payment",
        entity_id="pay_1",
        customer_id="cus_1",
        changed=["status"],
        before={"payment_id": "pay_1", "status": "processing"},
        after={"payment_id": "pay_1", "status": "succeeded"},
        cause_webhook_id="msg_1",
        cause_type="payment.succeeded",
        cause_at=moment,
        created_at=moment,
    )


class TestPostChange:
    def test_is_signed_with_the_change_id_and_verifies(
        self, endpoint: str, client: httpx.Client
    ) -> None:
        answer = post_change(client, f"{endpoint}/hooks", OUT_SECRET, a_change(), 5)
        assert answer.ok and answer.status_code == 204 and answer.error is None
        [request] = seen
        assert request["headers"]["webhook-id"] == "chg_abc"
        payload = Webhook(OUT_SECRET).verify(request["body"], request["headers"])
        assert payload["type"] == "payment.changed"
        assert payload["data"]["after"]["status"] == "succeeded"
        assert payload["data"]["cause"]["webhook_id"] == "msg_1"

    def test_a_redirect_is_a_failure_and_is_not_followed(
        self, endpoint: str, client: httpx.Client
    ) -> None:
        answer = post_change(client, f"{endpoint}/redirect", OUT_SECRET, a_change(), 5)
        assert not answer.ok and answer.error == "HTTP 302"
        assert [r["path"] for r in seen] == ["/redirect"]

    def test_keeps_only_the_first_bytes_of_a_large_answer(
        self, endpoint: str, client: httpx.Client
    ) -> None:
        answer = post_change(client, f"{endpoint}/big", OUT_SECRET, a_change(), 5)
        assert answer.status_code == 500 and answer.error == "HTTP 500"
        assert answer.head is not None and set(answer.head) == {"E"}
        assert len(answer.head) == RESPONSE_HEAD_BYTES

    def test_a_slow_endpoint_times_out(self, endpoint: str, client: httpx.Client) -> None:
        started = time.monotonic()
        answer = post_change(client, f"{endpoint}/slow", OUT_SECRET, a_change(), 0.5)
        assert time.monotonic() - started < 1.5
        assert answer.status_code is None and answer.error is not None
        assert "Timeout" in answer.error

    def test_a_closed_port_is_an_error_not_an_exception(self, client: httpx.Client) -> None:
        answer = post_change(client, "http://127.0.0.1:9/hooks", OUT_SECRET, a_change(), 2)
        assert not answer.ok and answer.error is not None and answer.status_code is None
