"""The acknowledgement promise across a PostgreSQL outage, with real processes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from sqlalchemy import func, select

from cli.db import upgrade
from cli.samples import sample_event
from shared.db import make_engine
from shared.models import WebhookEvent
from tests.pgcluster import PostgresCluster
from tests.support import (
    ADMIN_TOKEN,
    celery_worker,
    gunicorn,
    service_env,
    signed_headers,
    wait_until,
)


@pytest.fixture
def own_postgres() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    upgrade(cluster.url())
    yield cluster
    cluster.destroy()


class TestPostgresOutage:
    def test_ingest_answers_503_while_down_and_the_retried_delivery_is_processed_once(
        self, own_postgres: PostgresCluster, clean_redis: str, tmp_path: Path
    ) -> None:
        env = service_env(own_postgres.url(), clean_redis)
        body = json.dumps(sample_event("payment.succeeded"))
        headers = signed_headers(body, webhook_id="msg_outage")
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        with gunicorn(env, tmp_path) as url, celery_worker(env, tmp_path):
            own_postgres.stop("immediate")
            down = requests.post(f"{url}/webhooks/dodo", data=body, headers=headers, timeout=30)
            assert down.status_code == 503

            own_postgres.start()
            own_postgres.wait_ready()
            # Dodo retries the same delivery after a non-2xx answer.
            retried = wait_until(
                lambda: requests.post(
                    f"{url}/webhooks/dodo", data=body, headers=headers, timeout=30
                ),
                timeout=30,
                what="the ingest to record again",
            )
            assert retried.status_code == 202
            # and, as Dodo may, once more after our 2xx got lost on the way:
            again = requests.post(f"{url}/webhooks/dodo", data=body, headers=headers, timeout=30)
            assert again.status_code == 200

            final = wait_until(
                lambda: (
                    (
                        event := requests.get(
                            f"{url}/api/events/msg_outage", headers=admin, timeout=5
                        ).json()
                    )["status"]
                    in ("processed", "ignored")
                    and event
                ),
                timeout=60,
                what="the event to be processed",
            )
        assert final["attempts"] == 1
        assert final["outcome"] == "applied"
        engine = make_engine(own_postgres.url())
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(WebhookEvent)).scalar_one() == 1
        engine.dispose()
