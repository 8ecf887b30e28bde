"""Every event type Dodo's SDK knows, signed and posted to the real pipeline, ends final."""

from __future__ import annotations

import json
from pathlib import Path

import requests
from sqlalchemy import Engine, select

from cli.samples import sample_event, sdk_event_types
from shared.models import WebhookEvent
from tests.support import ADMIN_TOKEN, celery_worker, gunicorn, signed_headers, wait_until
from workers.handlers import ROUTES


class TestAllSdkTypesThroughThePipeline:
    def test_each_sdk_type_ends_processed_or_ignored_and_none_dead(
        self, env: dict[str, str], clean_db: Engine, tmp_path: Path
    ) -> None:
        types = sdk_event_types()
        assert len(types) == 48

        def statuses() -> dict[str, str]:
            with clean_db.connect() as conn:
                rows = conn.execute(select(WebhookEvent.type, WebhookEvent.status)).all()
            return {str(row.type): str(row.status) for row in rows}

        with gunicorn(env, tmp_path) as url, celery_worker(env, tmp_path) as worker:
            for index, event_type in enumerate(types):
                body = json.dumps(sample_event(event_type))
                webhook_id = f"msg_sdk_{index:02d}"
                answer = requests.post(
                    f"{url}/webhooks/dodo",
                    data=body,
                    headers=signed_headers(body, webhook_id=webhook_id),
                    timeout=10,
                )
                assert answer.status_code == 202, (event_type, answer.text)

            final = {"processed", "ignored", "dead"}
            wait_until(
                lambda: len(s := statuses()) == 48 and set(s.values()) <= final,
                timeout=60,
                what=f"all 48 events final; worker log:\n{worker.output()[-3000:]}",
            )
            result = statuses()
            assert {t: s for t, s in result.items() if s == "dead"} == {}
            for event_type, status in result.items():
                expected = "processed" if event_type in ROUTES else "ignored"
                assert status == expected, event_type

            auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            dispute = requests.get(f"{url}/api/disputes/dis_sample0001", headers=auth, timeout=10)
            assert dispute.status_code == 200
            assert len(dispute.json()["history"]) == 7
            for path in (
                "payments/pay_sample0001",
                "refunds/ref_sample0001",
                "subscriptions/sub_sample0001",
                "license-keys/id_sample0001",
            ):
                assert requests.get(f"{url}/api/{path}", headers=auth, timeout=10).ok, path
