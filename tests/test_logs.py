"""Structured logs: one JSON line per step of an event's life, and no customer data in them."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
from sqlalchemy import text
from sqlalchemy.exc import StatementError

from cli.samples import sample_event
from shared.db import make_engine
from shared.logs import JsonLineFormatter, log_step
from tests.support import (
    ADMIN_TOKEN,
    SECRET,
    celery_worker,
    gunicorn,
    signed_headers,
    wait_until,
)

EMAIL = "jane.leakcheck@example.com"
NAME = "Jane Leakcheck"
CARD = "4111111111111111"


def json_lines(output: str) -> list[dict[str, object]]:
    lines = []
    for line in output.splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def steps_of(output: str, webhook_id: str) -> dict[str, dict[str, object]]:
    return {
        str(line["step"]): line
        for line in json_lines(output)
        if line.get("webhook_id") == webhook_id and "step" in line
    }


class TestEventLifeInRealProcessLogs:
    def test_every_step_is_a_json_line_with_ids_and_no_customer_data(
        self, env: dict[str, str], tmp_path: Path
    ) -> None:
        """A payload carrying an email, a name and a card number, through gunicorn and celery."""
        event = sample_event(
            "payment.succeeded",
            overrides={
                "data.customer.email": EMAIL,
                "data.customer.name": NAME,
                "data.card_number": CARD,
            },
        )
        body = json.dumps(event)
        invalid = json.dumps({"type": "payment.succeeded", "customer": {"email": EMAIL}})
        with gunicorn(env, tmp_path, workers=1) as url, celery_worker(env, tmp_path) as worker:
            answer = requests.post(
                f"{url}/webhooks/dodo",
                data=body,
                headers=signed_headers(body, webhook_id="msg_log"),
            )
            assert answer.status_code == 202
            # Not an envelope: dead on arrival, with a reason that must name fields, not values.
            assert requests.post(
                f"{url}/webhooks/dodo",
                data=invalid,
                headers=signed_headers(invalid, webhook_id="msg_log_dead"),
            ).ok
            # Badly signed: rejected, and the body is never echoed.
            bad = signed_headers(body, webhook_id="msg_log_bad", secret="whsec_" + "B" * 32)
            assert requests.post(f"{url}/webhooks/dodo", data=body, headers=bad).status_code == 401

            def final() -> bool:
                status = requests.get(
                    f"{url}/api/events/msg_log",
                    headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                    timeout=5,
                ).json()["status"]
                return status in ("processed", "ignored", "dead")

            wait_until(final, timeout=60, what="the event to be final")
            wait_until(
                lambda: (
                    {"processed", "ignored", "dead"} & set(steps_of(worker.output(), "msg_log"))
                ),
                timeout=10,
                what="the worker's final log line",
            )
            ingest_log = (tmp_path / f"gunicorn-{url.rsplit(':', 1)[1]}.log").read_text()
            worker_log = worker.output()

        for output in (ingest_log, worker_log):
            for secret_thing in (EMAIL, NAME, CARD, SECRET, SECRET.removeprefix("whsec_")):
                assert secret_thing not in output

        ingest_steps = steps_of(ingest_log, "msg_log")
        # One line at INFO per delivery: `received` is DEBUG, `queued` carries the type.
        assert set(ingest_steps) == {"queued"}
        assert ingest_steps["queued"]["type"] == "payment.succeeded"
        assert ingest_steps["queued"]["level"] == "info"
        assert steps_of(ingest_log, "msg_log_dead")["dead"]["reason"]
        rejected = [line for line in json_lines(ingest_log) if line.get("step") == "rejected"]
        assert rejected and rejected[0]["http_status"] == 401

        worker_steps = steps_of(worker_log, "msg_log")
        assert worker_steps["processing"]["attempt"] == 1
        final_step = ({"processed", "ignored", "dead"} & set(worker_steps)).pop()
        assert worker_steps[final_step]["type"] == "payment.succeeded"
        assert "outcome" in worker_steps[final_step] or final_step == "dead"


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLineFormatter())
    logger = logging.getLogger("dodo_webhooks.test_logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


class TestJsonLineFormatter:
    def test_a_step_is_one_json_object_with_its_fields(
        self, captured: tuple[logging.Logger, io.StringIO]
    ) -> None:
        logger, stream = captured
        log_step(logger, "processed", webhook_id="msg_1", type="refund.failed", attempt=2)
        (line,) = stream.getvalue().splitlines()
        record = json.loads(line)
        assert record["step"] == record["msg"] == "processed"
        assert (record["webhook_id"], record["type"], record["attempt"]) == (
            "msg_1",
            "refund.failed",
            2,
        )
        assert record["level"] == "info"
        assert datetime.strptime(record["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)

    def test_the_timestamp_is_utc_whatever_the_machine_zone(
        self, captured: tuple[logging.Logger, io.StringIO], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        logger, stream = captured
        monkeypatch.setenv("TZ", "Asia/Kolkata")  # UTC+05:30, no daylight saving
        time.tzset()
        try:
            before = datetime.now(UTC)
            log_step(logger, "queued", webhook_id="msg_tz")
            log_step(logger, "queued", webhook_id="msg_tz")  # the second's text, cached
            after = datetime.now(UTC)
        finally:
            monkeypatch.undo()
            time.tzset()
        for line in stream.getvalue().splitlines():
            ts = datetime.strptime(json.loads(line)["ts"], "%Y-%m-%dT%H:%M:%S.%fZ")
            assert before.replace(microsecond=0) <= ts.replace(tzinfo=UTC) <= after


class TestDatabaseErrorsInLogs:
    def test_a_failed_statement_does_not_carry_its_parameters(self, tmp_path: Path) -> None:
        """The ingest logs a failed insert at ERROR: its text must not hold the raw body."""
        engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
        with pytest.raises(StatementError) as failure, engine.begin() as conn:
            conn.execute(text("INSERT INTO missing (body) VALUES (:body)"), {"body": EMAIL})
        engine.dispose()
        assert EMAIL not in str(failure.value)
