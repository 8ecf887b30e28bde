"""`dodo-webhooks send-test`: signed realistic samples, accepted by a real gunicorn ingest."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from cli.dev import DEV_ENV_FILE
from cli.main import main
from shared.catalog import HANDLED
from tests.support import OLD_SECRET, SECRET, free_port, gunicorn, service_env, stored_event


@pytest.fixture(scope="module")
def ingest_url(
    pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """One ingest for the module: the tests use fresh webhook ids, so they need no clean slate."""
    env = service_env(pg_url, redis_url)
    with gunicorn(env, tmp_path_factory.mktemp("ingest"), workers=1) as url:
        yield f"{url}/webhooks/dodo"


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def send(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["send-test", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def stored_body(engine: Engine, webhook_id: str) -> dict[str, object]:
    body = stored_event(engine, webhook_id).body
    assert body is not None
    return json.loads(body)  # type: ignore[no-any-return]


class TestSendTestAgainstTheIngest:
    @pytest.mark.parametrize(
        "event_type",
        ["payment.succeeded", "subscription.cancelled", "credit.added", "dispute.opened"],
    )
    def test_sample_is_accepted_and_recorded_with_its_type(
        self,
        event_type: str,
        ingest_url: str,
        pg_engine: Engine,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        code, out, _ = send(capsys, event_type, "--url", ingest_url, "--secret", SECRET, "--json")
        assert code == 0
        answer = json.loads(out)
        assert answer["http_status"] == 202
        assert answer["response"] == {"status": "queued", "webhook_id": answer["webhook_id"]}
        assert stored_body(pg_engine, answer["webhook_id"])["type"] == event_type

    def test_set_overrides_reach_the_recorded_body(
        self, ingest_url: str, pg_engine: Engine, capsys: pytest.CaptureFixture[str]
    ) -> None:
        webhook_id = unique("msg_set")
        code, _, err = send(
            capsys,
            "payment.failed",
            "--url",
            ingest_url,
            "--secret",
            SECRET,
            "--webhook-id",
            webhook_id,
            "--set",
            "data.total_amount=4200",
            "--set",
            "currency=EUR",
            "--set",
            "business_id=bus_mine",
        )
        assert code == 0, err
        body = stored_body(pg_engine, webhook_id)
        data = body["data"]
        assert isinstance(data, dict)
        assert (data["total_amount"], data["currency"], data["status"]) == (4200, "EUR", "failed")
        assert body["business_id"] == "bus_mine"

    def test_second_send_of_a_webhook_id_is_reported_duplicate(
        self, ingest_url: str, pg_engine: Engine, capsys: pytest.CaptureFixture[str]
    ) -> None:
        webhook_id = unique("msg_dup")
        argv = ("refund.succeeded", "--url", ingest_url, "--secret", SECRET)
        assert send(capsys, *argv, "--webhook-id", webhook_id)[0] == 0
        code, out, _ = send(capsys, *argv, "--webhook-id", webhook_id)
        assert code == 0
        assert out.startswith(f"200 duplicate: refund.succeeded, webhook-id {webhook_id}")

    def test_unknown_type_is_sent_with_a_warning_and_accepted(
        self, ingest_url: str, pg_engine: Engine, capsys: pytest.CaptureFixture[str]
    ) -> None:
        code, out, err = send(
            capsys, "widget.exploded", "--url", ingest_url, "--secret", SECRET, "--json"
        )
        assert code == 0
        assert "does not know 'widget.exploded'" in err
        assert json.loads(out)["http_status"] == 202

    def test_first_of_several_secrets_signs(
        self, ingest_url: str, pg_engine: Engine, capsys: pytest.CaptureFixture[str]
    ) -> None:
        code, out, _ = send(
            capsys, "payment.succeeded", "--url", ingest_url, "--secret", f"{OLD_SECRET},{SECRET}"
        )
        assert code == 0, out

    def test_wrong_secret_prints_401_and_exits_1(
        self, ingest_url: str, pg_engine: Engine, capsys: pytest.CaptureFixture[str]
    ) -> None:
        other = "whsec_" + "A" * 32
        code, out, err = send(capsys, "payment.succeeded", "--url", ingest_url, "--secret", other)
        assert code == 1
        assert out.startswith("401 ")
        assert "secret" in err


class TestSendTestDefaultsAndErrors:
    def test_connection_refused_is_one_line_and_exit_1(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        url = f"http://127.0.0.1:{free_port()}/webhooks/dodo"
        code, out, err = send(capsys, "payment.succeeded", "--url", url, "--secret", SECRET)
        assert code == 1
        assert out == ""
        assert err.count("\n") == 1
        assert f"could not reach {url}" in err and "running" in err

    def test_url_and_secret_default_to_the_dev_servers(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("DODO_PAYMENTS_WEBHOOK_KEY", raising=False)
        (tmp_path / DEV_ENV_FILE).write_text(
            f"DODO_WEBHOOKS_URL=http://127.0.0.1:9/webhooks/dodo\nDODO_PAYMENTS_WEBHOOK_KEY={SECRET}\n"
        )
        code, out, _ = send(
            capsys, "payment.succeeded", "--data-dir", str(tmp_path), "--dry-run", "--json"
        )
        assert code == 0
        request = json.loads(out)
        assert request["url"] == "http://127.0.0.1:9/webhooks/dodo"
        assert request["headers"]["webhook-signature"].startswith("v1,")

    def test_no_secret_anywhere_is_one_line(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("DODO_PAYMENTS_WEBHOOK_KEY", raising=False)
        code, _, err = send(capsys, "payment.succeeded", "--data-dir", str(tmp_path))
        assert code == 1
        assert "no signing secret" in err and err.count("\n") == 1

    def test_override_the_sdk_model_refuses_is_one_line(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        code, _, err = send(
            capsys, "payment.succeeded", "--secret", SECRET, "--set", "total_amount=lots"
        )
        assert code == 1
        assert "--set" in err and "data.total_amount" in err and err.count("\n") == 1

    def test_list_names_every_handled_type(self, capsys: pytest.CaptureFixture[str]) -> None:
        code, out, _ = send(capsys, "--list", "--json")
        assert code == 0
        listed = {item["type"]: item["handled"] for item in json.loads(out)}
        handled = {t for types in HANDLED.values() for t in types}
        assert handled <= set(listed)
        assert all(listed[t] for t in handled)
        assert len(listed) >= 48
