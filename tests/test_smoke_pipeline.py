"""The spine end to end: gunicorn ingest -> Redis -> celery worker -> PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import requests

from tests.support import ADMIN_TOKEN, celery_worker, envelope, gunicorn, signed_headers, wait_until


class TestPipeline:
    def test_signed_delivery_is_acknowledged_then_processed_by_a_real_worker(
        self, env: dict[str, str], tmp_path: Path
    ) -> None:
        body = envelope("payout.created", {"payout_id": "po_1"}, timestamp="2026-01-01T00:00:00Z")
        with gunicorn(env, tmp_path) as url, celery_worker(env, tmp_path):
            answer = requests.post(
                f"{url}/webhooks/dodo", data=body, headers=signed_headers(body, webhook_id="msg_a")
            )
            assert answer.status_code == 202
            assert answer.json() == {"status": "queued", "webhook_id": "msg_a"}

            def status() -> str:
                return str(
                    requests.get(
                        f"{url}/api/events/msg_a",
                        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                    ).json()["status"]
                )

            wait_until(lambda: status() == "ignored", timeout=30, what="event ignored")
