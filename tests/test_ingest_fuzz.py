"""Thousands of arbitrary deliveries: the ingest never answers 5xx and never crashes."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select

from ingest import create_app
from shared.models import WebhookEvent
from shared.settings import Settings
from tests.support import FRAMINGS, SECRET, body_of_length, deliver, gunicorn, signed_headers

ALLOWED = {200, 202, 400, 401, 405, 413, 415}
# Header values a client can put on the wire: latin-1, no line breaks.
header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"),
    max_size=120,
)
now = int(datetime.now(UTC).timestamp())
timestamps = st.one_of(
    header_text,
    st.integers(min_value=-(10**20), max_value=10**20).map(str),
    st.integers(min_value=now - 400, max_value=now + 400).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
)
signatures = st.one_of(
    header_text,
    st.lists(
        st.tuples(st.sampled_from(["v1", "v2", "v1a", ""]), header_text).map(",".join),
        max_size=4,
    ).map(" ".join),
    st.binary(max_size=48).map(lambda b: "v1," + __import__("base64").b64encode(b).decode()),
)
bodies = st.one_of(st.binary(max_size=600), st.text(max_size=600).map(str.encode))


@pytest.fixture
def app(settings: Settings) -> Iterator[Flask]:
    app = create_app(settings, check_connections=False)
    yield app
    app.extensions["dodo"].close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


FUZZ = settings(
    max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


class TestArbitraryInput:
    @FUZZ
    @given(
        webhook_id=st.one_of(header_text, st.none()),
        timestamp=st.one_of(timestamps, st.none()),
        signature=st.one_of(signatures, st.none()),
        body=bodies,
        framing=st.sampled_from(FRAMINGS),
    )
    def test_unsigned_noise_never_gets_a_5xx(
        self,
        client: FlaskClient,
        webhook_id: str | None,
        timestamp: str | None,
        signature: str | None,
        body: bytes,
        framing: str,
    ) -> None:
        headers = {
            name: value
            for name, value in (
                ("webhook-id", webhook_id),
                ("webhook-timestamp", timestamp),
                ("webhook-signature", signature),
            )
            if value is not None
        }
        answer = deliver(client, body, headers, framing)
        assert answer.status_code in ALLOWED, answer.get_data(as_text=True)

    @FUZZ
    @given(webhook_id=header_text, body=st.text(max_size=600), framing=st.sampled_from(FRAMINGS))
    def test_correctly_signed_arbitrary_bodies_are_kept_or_refused_never_5xx(
        self, client: FlaskClient, webhook_id: str, body: str, framing: str
    ) -> None:
        """Signed garbage reaches the envelope reader and the database: still no 5xx."""
        headers = signed_headers(body, webhook_id=webhook_id, secret=SECRET)
        answer = deliver(client, body, headers, framing)
        assert answer.status_code in ALLOWED, answer.get_data(as_text=True)
        if answer.status_code in (200, 202):
            assert answer.json["webhook_id"] == webhook_id


class TestRawHttpUnderGunicorn:
    def test_malformed_http_never_takes_the_server_down(
        self, env: dict[str, str], tmp_path: Path
    ) -> None:
        garbage = [
            b"POST /webhooks/dodo HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n{}",
            b"POST /webhooks/dodo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"POST /webhooks/dodo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"FFFFFFFFFFFFFFFFFFFF\r\n{}\r\n0\r\n\r\n",
            b"POST /webhooks/dodo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"200000\r\n{}",
            b"POST /webhooks/dodo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\n{}XX0\r\n\r\n",
            b"POST /webhooks/dodo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Length: 2\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            b"POST /webhooks/dodo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            b"2\r\n{}\r\n0\r\n\r\n",
            b"POST /webhooks/dodo HTTP/1.1\r\nHost: x\r\nwebhook-id: \xff\xfe\r\n"
            b"Content-Length: 2\r\n\r\n{}",
            b"\x00\x01\x02 garbage\r\n\r\n",
            b"POST /webhooks/dodo HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n",
        ]
        with gunicorn(env, tmp_path) as url:
            port = int(url.rsplit(":", 1)[1])
            for request in garbage * 5:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                    sock.sendall(request)
                    sock.shutdown(socket.SHUT_WR)
                    answer = sock.recv(200)
                status = int(answer.split(b" ")[1]) if answer.startswith(b"HTTP/") else 0
                assert status == 0 or status < 500 or status == 503, answer
            assert requests.get(f"{url}/healthz", timeout=5).status_code == 200

    def test_oversized_body_is_refused_before_it_is_read(
        self, env: dict[str, str], tmp_path: Path
    ) -> None:
        """A declared 100 MB body gets its 413 at once: the server does not wait to read it."""
        with gunicorn(env, tmp_path) as url:
            port = int(url.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(
                    b"POST /webhooks/dodo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n{"
                )
                answer = sock.recv(200)
            assert answer.startswith(b"HTTP/1.1 413"), answer


def post_over_http(url: str, body: bytes, headers: dict[str, str], framing: str) -> tuple[int, str]:
    """One POST to a real server: with a Content-Length, or in 16 KiB chunks with none."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        if framing == "content-length":
            conn.request("POST", "/webhooks/dodo", body=body, headers=headers)
        else:
            chunks = (body[i : i + 16384] for i in range(0, len(body), 16384))
            conn.request(
                "POST", "/webhooks/dodo", body=chunks, headers=headers, encode_chunked=True
            )
        answer = conn.getresponse()
        return answer.status, answer.read().decode()
    finally:
        conn.close()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
class TestBodyLimitUnderGunicorn:
    """MAX_BODY_BYTES holds however the body is framed: at the limit it is kept, past it 413."""

    def test_at_the_limit_is_recorded_and_one_byte_over_is_413_naming_the_limit(
        self,
        env: dict[str, str],
        settings: Settings,
        clean_db: Engine,
        tmp_path: Path,
        framing: str,
    ) -> None:
        limit = settings.max_body_bytes
        at_limit = body_of_length(limit)
        over = body_of_length(limit + 1)
        cut = over[:limit]  # signed over its first `limit` bytes: verifies if the rest is dropped
        with gunicorn(env, tmp_path) as url:
            status, text = post_over_http(
                url, at_limit.encode(), signed_headers(at_limit, webhook_id="msg_at"), framing
            )
            assert status == 202, text
            for webhook_id, signed_over in (("msg_over", over), ("msg_cut", cut)):
                headers = signed_headers(signed_over, webhook_id=webhook_id)
                status, text = post_over_http(url, over.encode(), headers, framing)
                assert status == 413, text
                assert json.loads(text)["error"] == (
                    f"body over the limit of {limit} bytes (MAX_BODY_BYTES)"
                )
        assert recorded_ids(clean_db) == ["msg_at"]

    def test_three_mib_is_refused_413_and_the_client_reads_it(
        self, env: dict[str, str], clean_db: Engine, tmp_path: Path, framing: str
    ) -> None:
        """Not a broken pipe: the rest of the body is read and dropped before the answer."""
        with gunicorn(env, tmp_path) as url:
            for n in range(10):
                big = body_of_length(3 * 1024 * 1024, payment_id=f"pay_{n}")
                headers = signed_headers(big, webhook_id=f"msg_3mib_{n}")
                status, text = post_over_http(url, big.encode(), headers, framing)
                assert status == 413, text
            assert requests.get(f"{url}/healthz", timeout=5).status_code == 200
        assert recorded_ids(clean_db) == []


def recorded_ids(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(select(WebhookEvent.webhook_id)).scalars())
