"""POST /webhooks/dodo: what is accepted, what is refused; a refusal leaves nothing behind."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, func, select, text

from cli.samples import sample_event
from ingest import create_app
from ingest.app import APP_LOAD_ERROR
from ingest.recording import record_delivery
from ingest.verify import Rejection, read_timestamp
from shared.catalog import queue_for
from shared.models import EventStatus, WebhookEvent
from shared.queue import wake_key
from shared.settings import Settings
from tests.support import (
    FRAMINGS,
    OLD_SECRET,
    ROOT,
    SECRET,
    VENV_BIN,
    body_of_length,
    deliver,
    envelope,
    free_port,
    signed_headers,
    stored_event,
)

URL = "/webhooks/dodo"
BODY = envelope("payment.succeeded", {"payment_id": "pay_1"}, timestamp="2026-01-01T00:00:00Z")


@pytest.fixture
def make_app() -> Iterator[Callable[[Settings], Flask]]:
    """create_app, with each app's connections closed at the end of the test."""
    apps: list[Flask] = []

    def make(settings: Settings) -> Flask:
        apps.append(create_app(settings, check_connections=False))
        return apps[-1]

    yield make
    for app in apps:
        app.extensions["dodo"].close()


@pytest.fixture
def app(settings: Settings, make_app: Callable[[Settings], Flask]) -> Flask:
    return make_app(settings)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def recorded(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(WebhookEvent)).scalar_one())


def event_row(engine: Engine, webhook_id: str) -> WebhookEvent:
    return stored_event(engine, webhook_id)


class TestAcceptedDeliveries:
    def test_new_delivery_is_recorded_and_answered_202_queued(
        self, client: FlaskClient, clean_db: Engine
    ) -> None:
        answer = client.post(URL, data=BODY, headers=signed_headers(BODY, webhook_id="msg_1"))
        assert answer.status_code == 202
        assert answer.json == {"status": "queued", "webhook_id": "msg_1"}
        row = event_row(clean_db, "msg_1")
        assert row.status == EventStatus.PENDING
        assert row.type == "payment.succeeded"
        assert bytes(row.body) == BODY.encode()
        assert row.event_at == datetime(2026, 1, 1, tzinfo=UTC)
        sent = signed_headers(BODY, webhook_id="msg_1")
        assert row.webhook_ts == int(sent["webhook-timestamp"])
        assert row.headers["webhook-id"] == "msg_1"
        assert row.attempts == 0
        assert row.last_error is None
        assert row.received_at == row.enqueued_at
        assert abs(datetime.now(UTC) - row.received_at) < timedelta(minutes=1)
        # The body and headers are kept in their day's partition, not in the event's row.
        with clean_db.connect() as conn:
            held = conn.execute(
                text(
                    "SELECT tableoid::regclass::text, body, headers->>'webhook-id' FROM"
                    " event_bodies WHERE webhook_id = 'msg_1' AND stored_at = :at"
                ),
                {"at": row.received_at},
            ).one()
            in_row = conn.execute(
                text("SELECT body FROM webhook_events WHERE webhook_id = 'msg_1'")
            ).scalar()
        assert held == (f"event_bodies_{row.received_at:%Y%m%d}", BODY.encode(), "msg_1")
        assert in_row is None

    def test_the_recorder_stores_every_value_as_given(self, clean_db: Engine) -> None:
        """Bytes that are not UTF-8, quotes and non-ASCII in headers, an instant in another zone."""
        body = b'{"a": "\\u00e9"}\x00\xff\xfe'
        headers = {"webhook-id": 'msg_"q"\\', "x-note": "café ✓"}
        at = datetime(2026, 3, 1, 12, 0, tzinfo=timezone(timedelta(hours=-5)))
        fields = {
            "webhook_id": 'msg_"q"\\',
            "webhook_ts": 1_767_225_600,
            "headers": headers,
            "body": body,
            "event_type": "payment.succeeded",
            "event_at": at,
        }
        assert record_delivery(clean_db, **fields) is True
        assert record_delivery(clean_db, **fields) is False  # the same id again: a duplicate
        row = event_row(clean_db, 'msg_"q"\\')
        assert bytes(row.body) == body
        assert row.headers == headers
        assert row.event_at == datetime(2026, 3, 1, 17, 0, tzinfo=UTC)
        assert row.webhook_ts == 1_767_225_600
        assert row.status == EventStatus.PENDING
        dead = {**fields, "webhook_id": "msg_dead", "event_type": None, "event_at": None}
        assert record_delivery(clean_db, **dead, dead_reason="not an envelope") is True
        row = event_row(clean_db, "msg_dead")
        assert (row.status, row.last_error, row.type) == (EventStatus.DEAD, "not an envelope", None)
        assert row.enqueued_at is None

    def test_duplicate_is_answered_200_and_creates_nothing_new(
        self, client: FlaskClient, clean_db: Engine
    ) -> None:
        headers = signed_headers(BODY, webhook_id="msg_dup")
        assert client.post(URL, data=BODY, headers=headers).status_code == 202
        again = client.post(URL, data=BODY, headers=headers)
        assert again.status_code == 200
        assert again.json == {"status": "duplicate", "webhook_id": "msg_dup"}
        assert recorded(clean_db) == 1

    def test_delivery_signed_with_the_older_secret_is_accepted(self, client: FlaskClient) -> None:
        headers = signed_headers(BODY, webhook_id="msg_old", secret=OLD_SECRET)
        assert client.post(URL, data=BODY, headers=headers).status_code == 202

    def test_one_right_signature_among_several_is_accepted(self, client: FlaskClient) -> None:
        headers = signed_headers(BODY, webhook_id="msg_multi")
        wrong = signed_headers(BODY, webhook_id="msg_multi", secret="whsec_" + "A" * 32)
        headers["webhook-signature"] = " ".join(
            ["v2,abcd", wrong["webhook-signature"], headers["webhook-signature"]]
        )
        assert client.post(URL, data=BODY, headers=headers).status_code == 202

    def test_signature_from_another_secret_is_401(
        self, client: FlaskClient, clean_db: Engine
    ) -> None:
        headers = signed_headers(BODY, webhook_id="msg_x", secret="whsec_" + "B" * 32)
        assert client.post(URL, data=BODY, headers=headers).status_code == 401
        assert recorded(clean_db) == 0

    def test_queue_down_still_acknowledges_what_was_recorded(
        self, settings: Settings, clean_db: Engine, make_app: Callable[[Settings], Flask]
    ) -> None:
        """Redis carries only the work signal: the durable record is what the 2xx promises."""
        app = make_app(settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"}))
        app.extensions["dodo"].celery.conf.broker_transport_options["max_retries"] = 0
        answer = app.test_client().post(
            URL, data=BODY, headers=signed_headers(BODY, webhook_id="msg_noq")
        )
        assert answer.status_code == 202
        assert event_row(clean_db, "msg_noq").status == EventStatus.PENDING

    def test_with_redis_unreachable_only_the_first_delivery_tries_to_publish(
        self,
        settings: Settings,
        clean_db: Engine,
        make_app: Callable[[Settings], Flask],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Publishing to a dead Redis costs seconds; paid once, not on every delivery."""
        app = make_app(settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"}))
        metrics = app.extensions["dodo"].metrics
        deferred, queued = metrics.deferred._value.get(), metrics.queued._value.get()
        client = app.test_client()
        publisher = app.extensions["dodo"].signal._direct
        attempts = []
        original = publisher._wake

        def counting_wake(*args: object) -> None:
            attempts.append(args)
            original(*args)

        monkeypatch.setattr(publisher, "_wake", counting_wake)
        for n in range(10):
            body = BODY.replace("pay_1", f"pay_{n}")
            answer = client.post(URL, data=body, headers=signed_headers(body, webhook_id=f"m{n}"))
            assert answer.status_code == 202
        assert len(attempts) == 2  # the first delivery's push and its one retry, refused
        assert metrics.deferred._value.get() - deferred == 10
        assert metrics.queued._value.get() == queued
        assert recorded(clean_db) == 10

    def test_a_redis_connection_the_server_closed_is_replaced_and_the_delivery_queued(
        self, app: Flask, clean_db: Engine
    ) -> None:
        client = app.test_client()
        state = app.extensions["dodo"]
        first = BODY.replace("pay_1", "pay_r1")
        answer = client.post(URL, data=first, headers=signed_headers(first, webhook_id="r1"))
        assert answer.status_code == 202
        # A drain took the first one and went back to sleep: the next delivery wakes it.
        queue = queue_for("payment.succeeded")
        assert state.redis.llen(queue) == 1
        state.redis.delete(queue, wake_key(queue))
        # What a Redis restart does to the publisher's connection, and every other one.
        killed = state.redis.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "no")
        assert killed >= 1
        queued = state.metrics.queued._value.get()
        second = BODY.replace("pay_1", "pay_r2")
        answer = client.post(URL, data=second, headers=signed_headers(second, webhook_id="r2"))
        assert answer.status_code == 202
        assert state.metrics.queued._value.get() == queued + 1  # sent, not deferred
        assert state.redis.llen(queue) == 1

    def test_a_connection_the_server_dropped_is_replaced_without_a_503(
        self, client: FlaskClient, clean_db: Engine
    ) -> None:
        first = BODY.replace("pay_1", "pay_before")
        answer = client.post(URL, data=first, headers=signed_headers(first, webhook_id="m_a"))
        assert answer.status_code == 202
        with clean_db.connect() as conn:
            # The recorder's connection among them: what a PostgreSQL restart or a proxy does.
            ended = conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalar_one()
        assert ended >= 1
        second = BODY.replace("pay_1", "pay_after")
        answer = client.post(URL, data=second, headers=signed_headers(second, webhook_id="m_b"))
        assert answer.status_code == 202
        assert event_row(clean_db, "m_b").status == EventStatus.PENDING

    def test_database_down_answers_503_and_records_nothing(
        self, settings: Settings, make_app: Callable[[Settings], Flask]
    ) -> None:
        down = settings.model_copy(
            update={"database_url": "postgresql+psycopg://postgres@127.0.0.1:1/nowhere"}
        )
        answer = (
            make_app(down)
            .test_client()
            .post(URL, data=BODY, headers=signed_headers(BODY, webhook_id="msg_503"))
        )
        assert answer.status_code == 503
        assert "retry" in answer.json["error"]


class TestSignedButInvalidEvents:
    """A body that verifies is Dodo's: it is kept and goes dead with the reason, never dropped."""

    @pytest.mark.parametrize(
        ("body", "reason"),
        [
            ("not json at all", "Invalid JSON"),
            ("[1, 2]", "object"),
            (
                json.dumps({"business_id": "b", "timestamp": "2026-01-01T00:00:00Z", "data": {}}),
                "type",
            ),
            (
                json.dumps(
                    {
                        "business_id": "b",
                        "type": "payment.succeeded",
                        "data": {},
                        "timestamp": "yesterday",
                    }
                ),
                "timestamp",
            ),
            ('{"business_id": "b", "type": "x\\u0000y", "data": {}, "timestamp": "2026"}', "type"),
        ],
    )
    def test_is_recorded_dead_with_the_reason_and_answered_2xx(
        self, client: FlaskClient, clean_db: Engine, body: str, reason: str
    ) -> None:
        answer = client.post(URL, data=body, headers=signed_headers(body, webhook_id="msg_bad"))
        assert answer.status_code == 202
        assert answer.json["status"] == "dead"
        row = event_row(clean_db, "msg_bad")
        assert row.status == EventStatus.DEAD
        assert reason in (row.last_error or "")
        assert bytes(row.body) == body.encode()


class TestEventSubjects:
    """Whose a delivery is (`customer_id`, `payment_id`) is recorded with it, for the erasure."""

    @pytest.mark.parametrize(
        ("event_type", "overrides", "subjects"),
        [
            (
                "payment.succeeded",
                {"data.customer.customer_id": "cus_pay", "data.payment_id": "pay_pay"},
                ("cus_pay", "pay_pay"),
            ),
            # A refund names its customer: found by that, its payment is not trusted as theirs.
            (
                "refund.succeeded",
                {"data.customer.customer_id": "cus_ref", "data.payment_id": "pay_ref"},
                ("cus_ref", None),
            ),
            # A dispute names no customer: found through its payment.
            ("dispute.opened", {"data.payment_id": "pay_dis"}, (None, "pay_dis")),
            (
                "subscription.active",
                {"data.customer.customer_id": "cus_sub", "data.payment_id": "pay_sub"},
                ("cus_sub", None),
            ),
            (
                "license_key.created",
                {"data.customer_id": "cus_lic", "data.payment_id": "pay_lic"},
                ("cus_lic", None),
            ),
            ("credit.added", {"data.customer_id": "cus_cre"}, ("cus_cre", None)),
            ("payout.sent", {}, (None, None)),
        ],
    )
    def test_the_customer_and_payment_of_each_family_are_recorded(
        self,
        client: FlaskClient,
        clean_db: Engine,
        event_type: str,
        overrides: dict[str, str],
        subjects: tuple[str | None, str | None],
    ) -> None:
        body = json.dumps(sample_event(event_type, overrides=overrides))
        answer = client.post(URL, data=body, headers=signed_headers(body, webhook_id="msg_subj"))
        assert answer.status_code == 202
        row = event_row(clean_db, "msg_subj")
        assert (row.customer_id, row.payment_id) == subjects

    @pytest.mark.parametrize(
        "data",
        [
            {"customer": {"customer_id": "c" * 256}, "payment_id": "p" * 256},
            {"customer": {"customer_id": 7}, "payment_id": ["pay_1"]},
            # JSON may escape a NUL, which PostgreSQL's text cannot hold: not a 503.
            {"customer_id": "cus_\x00x", "payment_id": "pay_\x00x"},
        ],
        ids=["too-long", "not-strings", "nul"],
    )
    def test_an_id_the_column_cannot_hold_is_recorded_as_null(
        self, client: FlaskClient, clean_db: Engine, data: dict[str, Any]
    ) -> None:
        body = envelope("payment.succeeded", data, timestamp="2026-01-01T00:00:00Z")
        answer = client.post(URL, data=body, headers=signed_headers(body, webhook_id="msg_long"))
        assert answer.status_code == 202
        row = event_row(clean_db, "msg_long")
        assert (row.customer_id, row.payment_id) == (None, None)
        assert bytes(row.body) == body.encode()

    def test_a_delivery_dead_on_arrival_has_neither(
        self, client: FlaskClient, clean_db: Engine
    ) -> None:
        body = '{"type": "payment.succeeded", "data": {"customer_id": "cus_1"}}'
        answer = client.post(URL, data=body, headers=signed_headers(body, webhook_id="msg_doa"))
        assert answer.json["status"] == "dead"
        row = event_row(clean_db, "msg_doa")
        assert (row.customer_id, row.payment_id) == (None, None)


def tamper(headers: dict[str, str], **changes: str) -> dict[str, str]:
    return {**headers, **{k.replace("_", "-"): v for k, v in changes.items()}}


NOW = datetime.now(UTC)


@pytest.mark.parametrize("framing", FRAMINGS)
class TestHostileDeliveries:
    """Each is refused with its status, and nothing is recorded — with a Content-Length or
    chunked."""

    @pytest.mark.parametrize(
        ("mutate", "status"),
        [
            (lambda h: {k: v for k, v in h.items() if k != "webhook-id"}, 401),
            (lambda h: {k: v for k, v in h.items() if k != "webhook-timestamp"}, 401),
            (lambda h: {k: v for k, v in h.items() if k != "webhook-signature"}, 401),
            (lambda h: tamper(h, webhook_signature=""), 401),
            (lambda h: tamper(h, webhook_timestamp=str(int(NOW.timestamp()) - 400)), 401),
            (lambda h: tamper(h, webhook_timestamp=str(int(NOW.timestamp()) + 400)), 401),
            (lambda h: tamper(h, webhook_timestamp="-1"), 401),
            (lambda h: tamper(h, webhook_timestamp="9" * 40), 401),
            (lambda h: tamper(h, webhook_timestamp="-" + "9" * 40), 401),
            (lambda h: tamper(h, webhook_timestamp="abc"), 400),
            (lambda h: tamper(h, webhook_timestamp="soon"), 400),
            (lambda h: tamper(h, webhook_timestamp="1e400"), 400),
            (lambda h: tamper(h, webhook_timestamp="nan"), 400),
            (lambda h: tamper(h, webhook_timestamp=str(int(NOW.timestamp())) + ".5"), 400),
            (lambda h: tamper(h, webhook_timestamp="0x" + format(int(NOW.timestamp()), "x")), 400),
            (lambda h: tamper(h, webhook_timestamp="+" + str(int(NOW.timestamp()))), 400),
            (lambda h: tamper(h, webhook_timestamp="-"), 400),
            (lambda h: tamper(h, webhook_signature="v1"), 400),
            (lambda h: tamper(h, webhook_signature="v1,a,b"), 400),
            (lambda h: tamper(h, webhook_signature="v1,abc"), 400),
            (lambda h: tamper(h, webhook_signature="v2,c2lnbmF0dXJl"), 401),
            (lambda h: tamper(h, webhook_signature="v1,c2lnbmF0dXJl"), 401),
            (lambda h: tamper(h, webhook_id="has space"), 400),
            (lambda h: tamper(h, webhook_id="m" * 256), 400),
            (lambda h: tamper(h, webhook_id="msg_\u00e9"), 400),
        ],
        ids=[
            "no-id",
            "no-timestamp",
            "no-signature",
            "empty-signature",
            "timestamp-too-old",
            "timestamp-too-new",
            "timestamp-negative",
            "timestamp-enormous",
            "timestamp-enormous-negative",
            "timestamp-abc",
            "timestamp-word",
            "timestamp-overflow",
            "timestamp-nan",
            "timestamp-fraction",
            "timestamp-hex",
            "timestamp-plus-sign",
            "timestamp-only-minus",
            "v1-without-comma",
            "v1-two-commas",
            "signature-not-base64",
            "only-unknown-scheme",
            "v1-that-does-not-match",
            "id-with-space",
            "id-too-long",
            "id-not-ascii",
        ],
    )
    def test_malformed_headers_are_refused(
        self, client: FlaskClient, clean_db: Engine, framing: str, mutate: object, status: int
    ) -> None:
        headers = mutate(signed_headers(BODY, webhook_id="msg_h"))  # type: ignore[operator]
        answer = deliver(client, BODY, headers, framing)
        assert answer.status_code == status, answer.json
        assert "error" in answer.json
        assert recorded(clean_db) == 0

    def test_malformed_timestamp_is_400_naming_the_header(
        self, client: FlaskClient, framing: str
    ) -> None:
        """The standardwebhooks library calls it "Invalid Signature Headers", a 401."""
        headers = tamper(signed_headers(BODY, webhook_id="msg_ts"), webhook_timestamp="abc")
        answer = deliver(client, BODY, headers, framing)
        assert answer.status_code == 400
        assert "webhook-timestamp" in answer.json["error"]

    def test_body_changed_after_signing_is_401(
        self, client: FlaskClient, clean_db: Engine, framing: str
    ) -> None:
        headers = signed_headers(BODY, webhook_id="msg_t")
        answer = deliver(client, BODY.replace("pay_1", "pay_2"), headers, framing)
        assert answer.status_code == 401
        assert recorded(clean_db) == 0

    def test_non_utf8_body_is_400(
        self, client: FlaskClient, clean_db: Engine, framing: str
    ) -> None:
        headers = signed_headers(BODY, webhook_id="msg_u")
        answer = deliver(client, b"\xff\xfe" + BODY.encode(), headers, framing)
        assert answer.status_code == 400
        assert recorded(clean_db) == 0

    def test_body_at_the_limit_is_accepted(
        self, client: FlaskClient, clean_db: Engine, settings: Settings, framing: str
    ) -> None:
        body = body_of_length(settings.max_body_bytes)
        assert len(body.encode()) == settings.max_body_bytes
        answer = deliver(client, body, signed_headers(body, webhook_id="msg_max"), framing)
        assert answer.status_code == 202, answer.json
        assert answer.json["status"] == "queued"
        assert bytes(event_row(clean_db, "msg_max").body) == body.encode()

    def test_body_one_byte_over_the_limit_is_413_naming_it(
        self, client: FlaskClient, clean_db: Engine, settings: Settings, framing: str
    ) -> None:
        body = body_of_length(settings.max_body_bytes + 1)
        answer = deliver(client, body, signed_headers(body, webhook_id="msg_big"), framing)
        assert answer.status_code == 413
        assert str(settings.max_body_bytes) in answer.json["error"]
        assert "MAX_BODY_BYTES" in answer.json["error"]
        assert recorded(clean_db) == 0

    def test_body_over_the_limit_signed_over_its_first_limit_bytes_is_413(
        self, client: FlaskClient, clean_db: Engine, settings: Settings, framing: str
    ) -> None:
        """Cut at the limit and verified, this one would pass the signature check."""
        body = body_of_length(settings.max_body_bytes) + "x"
        head = body[: settings.max_body_bytes]
        answer = deliver(client, body, signed_headers(head, webhook_id="msg_cut"), framing)
        assert answer.status_code == 413
        assert recorded(clean_db) == 0

    def test_body_three_times_the_limit_is_413(
        self, client: FlaskClient, clean_db: Engine, settings: Settings, framing: str
    ) -> None:
        body = body_of_length(3 * settings.max_body_bytes)
        answer = deliver(client, body, signed_headers(body, webhook_id="msg_3x"), framing)
        assert answer.status_code == 413
        assert recorded(clean_db) == 0

    @pytest.mark.parametrize("encoding", ["gzip", "br", "deflate", "x-unknown"])
    def test_compressed_body_is_415_naming_the_encoding(
        self, client: FlaskClient, clean_db: Engine, framing: str, encoding: str
    ) -> None:
        """Dodo sends plain JSON; a compressed body is refused with what is wrong, not as
        "not UTF-8" or a bad signature."""
        compressed = gzip.compress(BODY.encode())
        headers = {**signed_headers(BODY, webhook_id="msg_gz"), "Content-Encoding": encoding}
        answer = deliver(client, compressed, headers, framing)
        assert answer.status_code == 415
        assert answer.json["error"].startswith(f"Content-Encoding {encoding} is not supported")
        assert recorded(clean_db) == 0

    def test_identity_encoding_is_accepted(self, client: FlaskClient, framing: str) -> None:
        headers = {**signed_headers(BODY, webhook_id="msg_id"), "Content-Encoding": "identity"}
        assert deliver(client, BODY, headers, framing).status_code == 202

    def test_signature_outside_the_window_is_401_even_when_correct(
        self, client: FlaskClient, framing: str
    ) -> None:
        at = datetime.now(UTC) - timedelta(minutes=6)
        headers = signed_headers(BODY, webhook_id="msg_late", at=at)
        assert deliver(client, BODY, headers, framing).status_code == 401


class TestReadTimestamp:
    """`webhook-timestamp`: integer seconds, within five minutes of now either way."""

    NOW = 1_767_225_600.0

    @pytest.mark.parametrize("offset", [-300, 0, 300])
    def test_the_window_includes_its_edges(self, offset: int) -> None:
        value = str(int(self.NOW) + offset)
        assert read_timestamp(value, now=self.NOW) == int(self.NOW) + offset

    @pytest.mark.parametrize(("offset", "reason"), [(-301, "too old"), (301, "too new")])
    def test_one_second_past_an_edge_is_401(self, offset: int, reason: str) -> None:
        with pytest.raises(Rejection) as refused:
            read_timestamp(str(int(self.NOW) + offset), now=self.NOW)
        assert (refused.value.status, reason in refused.value.reason) == (401, True)

    @pytest.mark.parametrize("value", ["", " ", "1767225600.0", "1_767_225_600", "١٧٦٧٢٢٥٦٠٠"])
    def test_anything_but_ascii_digits_is_400(self, value: str) -> None:
        with pytest.raises(Rejection) as refused:
            read_timestamp(value, now=self.NOW)
        assert refused.value.status == 400


class TestMethods:
    def test_get_is_405_json(self, client: FlaskClient) -> None:
        answer = client.get(URL)
        assert answer.status_code == 405
        assert "error" in answer.json


class TestEventsApi:
    def test_event_status_needs_the_admin_token(self, client: FlaskClient) -> None:
        assert client.get("/api/events/msg_1").status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert client.get("/api/events/msg_1", headers=wrong).status_code == 401

    def test_unknown_event_is_404_json(self, client: FlaskClient) -> None:
        answer = client.get("/api/events/nope", headers=admin())
        assert answer.status_code == 404
        assert "not found" in answer.json["error"]

    def test_recorded_event_is_described(self, client: FlaskClient) -> None:
        client.post(URL, data=BODY, headers=signed_headers(BODY, webhook_id="msg_api"))
        answer = client.get("/api/events/msg_api", headers=admin())
        assert answer.status_code == 200
        assert answer.json["status"] == "pending"
        assert set(answer.json) == {
            "webhook_id",
            "type",
            "status",
            "outcome",
            "attempts",
            "last_error",
            "received_at",
            "processed_at",
        }

    def test_admin_api_without_a_configured_token_is_503(
        self, settings: Settings, make_app: Callable[[Settings], Flask]
    ) -> None:
        app = make_app(settings.model_copy(update={"admin_token": None}))
        answer = app.test_client().get("/api/events/x", headers=admin())
        assert answer.status_code == 503
        assert "ADMIN_TOKEN" in answer.json["error"]


def admin() -> dict[str, str]:
    from tests.support import ADMIN_TOKEN

    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


class TestStartup:
    """Misconfiguration stops the start with one line naming the variable."""

    @pytest.mark.parametrize(
        ("update", "variable"),
        [
            ({"database_url": "postgresql+psycopg://postgres@127.0.0.1:1/x"}, "DATABASE_URL"),
            ({"redis_url": "redis://:hunter2@127.0.0.1:1/0"}, "REDIS_URL"),
            ({"dodo_payments_webhook_key": []}, "DODO_PAYMENTS_WEBHOOK_KEY"),
        ],
    )
    def test_create_app_exits_with_one_line_naming_the_variable(
        self,
        settings: Settings,
        update: dict[str, object],
        variable: str,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        with pytest.raises(SystemExit) as stopped:
            create_app(settings.model_copy(update=update))
        assert stopped.value.code == APP_LOAD_ERROR
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1
        assert err[0].startswith(f"dodo-webhooks ingest: {variable}")
        assert "hunter2" not in err[0]

    def test_gunicorn_stops_instead_of_respawning_on_a_malformed_secret(
        self, env: dict[str, str]
    ) -> None:
        argv = [str(VENV_BIN / "gunicorn"), "-b", f"127.0.0.1:{free_port()}", "ingest:create_app()"]
        done = subprocess.run(
            argv,
            env={
                **os.environ,
                **env,
                "DODO_PAYMENTS_WEBHOOK_KEY": "whsec_%%%",
                "PYTHONPATH": str(ROOT),
            },
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert done.returncode == APP_LOAD_ERROR
        assert "DODO_PAYMENTS_WEBHOOK_KEY: secret #1 is not a valid" in done.stderr
        assert "Traceback" not in done.stderr
        # gunicorn.conf.py checks in the master: no worker was ever booted.
        assert "Booting worker" not in done.stderr


class TestHealth:
    def test_healthz_is_200(self, client: FlaskClient) -> None:
        assert client.get("/healthz").status_code == 200

    def test_readyz_is_200_when_database_and_redis_answer(self, client: FlaskClient) -> None:
        assert client.get("/readyz").json == {"status": "ready"}

    def test_readyz_names_what_failed(
        self, settings: Settings, make_app: Callable[[Settings], Flask]
    ) -> None:
        app = make_app(settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"}))
        answer = app.test_client().get("/readyz")
        assert answer.status_code == 503
        assert set(answer.json["failed"]) == {"redis"}


_ = SECRET
