"""The ingest's direct publish writes exactly the message Celery's send_task writes."""

from __future__ import annotations

import base64
import json
from typing import Any

import redis

from ingest.publisher import DirectPublisher, drain_message, process_event_message
from shared.catalog import OUTBOUND_QUEUE
from shared.queue import (
    DELIVER_CHANGE,
    WAKE_TTL_SECONDS,
    enqueue_deliveries,
    make_celery,
    send_drain,
    wake_key,
)
from shared.settings import Settings

# Fields that differ on every message (fresh uuids) or with the sending process.
VOLATILE_HEADERS = {"id", "root_id", "origin"}
VOLATILE_PROPERTIES = {"correlation_id", "delivery_tag"}


def comparable(raw: bytes) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(raw)
    headers = message["headers"]
    properties = message["properties"]
    assert headers["id"] == headers["root_id"] == properties["correlation_id"]
    for name in VOLATILE_HEADERS:
        headers.pop(name)
    for name in VOLATILE_PROPERTIES:
        properties.pop(name)
    return message


class TestDirectPublisher:
    def test_drain_message_equals_what_celery_send_task_writes(self, settings: Settings) -> None:
        """If a Celery or kombu upgrade changes the wire format, this fails first."""
        app = make_celery(settings)
        client = redis.Redis.from_url(settings.redis_url)
        try:
            client.delete("payments", wake_key("payments"))
            send_drain(app, "payments", retry=False)
            (celerys,) = client.lrange("payments", 0, -1)
            client.delete("payments")
            DirectPublisher(client, app).send("msg_same", "payment.succeeded")
            (ours,) = client.lrange("payments", 0, -1)
        finally:
            client.delete("payments", wake_key("payments"))
            client.close()
            app.close()
        assert comparable(ours) == comparable(celerys)

    def test_process_event_message_equals_what_celery_send_task_writes(
        self, settings: Settings
    ) -> None:
        app = make_celery(settings)
        client = redis.Redis.from_url(settings.redis_url)
        try:
            client.delete("credits")
            app.send_task("workers.process_event", args=["msg_same"], queue="credits", retry=False)
            (celerys,) = client.lrange("credits", 0, -1)
        finally:
            client.delete("credits")
            client.close()
            app.close()
        reply_to = str(app.thread_oid)
        ours = process_event_message("msg_same", "credits", origin="o", reply_to=reply_to)
        assert comparable(ours) == comparable(celerys)

    def test_only_the_first_delivery_while_the_flag_is_set_sends_a_drain(
        self, settings: Settings
    ) -> None:
        """A backlog of deliveries costs one message per queue, not one per event."""
        app = make_celery(settings)
        client = redis.Redis.from_url(settings.redis_url)
        publisher = DirectPublisher(client, app)
        try:
            client.delete("payments", "refunds", wake_key("payments"), wake_key("refunds"))
            for n in range(5):
                publisher.send(f"msg_{n}", "payment.succeeded")
            publisher.send("msg_r", "refund.succeeded")
            assert client.llen("payments") == 1
            assert client.llen("refunds") == 1
            assert 0 < int(client.ttl(wake_key("payments"))) <= WAKE_TTL_SECONDS
            client.delete(wake_key("payments"))  # what a drain does when its queue is empty
            publisher.send("msg_after", "payment.succeeded")
            assert client.llen("payments") == 2
        finally:
            publisher.close()
            client.delete("payments", "refunds", wake_key("payments"), wake_key("refunds"))
            client.close()
            app.close()

    def test_a_redis_that_forgot_the_script_loads_it_again(self, settings: Settings) -> None:
        app = make_celery(settings)
        client = redis.Redis.from_url(settings.redis_url)
        publisher = DirectPublisher(client, app)
        try:
            client.delete("credits", wake_key("credits"))
            client.script_flush()  # what a Redis restarted empty has
            publisher.send("msg_1", "credit.added")
            assert client.llen("credits") == 1
        finally:
            publisher.close()
            client.delete("credits", wake_key("credits"))
            client.close()
            app.close()

    def test_each_message_has_fresh_ids_and_the_routing_of_its_family(self) -> None:
        first = json.loads(drain_message("credits", origin="o", reply_to="r"))
        second = json.loads(drain_message("credits", origin="o", reply_to="r"))
        assert first["headers"]["id"] != second["headers"]["id"]
        assert first["properties"]["delivery_tag"] != second["properties"]["delivery_tag"]
        assert first["properties"]["delivery_info"]["routing_key"] == "credits"

    def test_only_plain_redis_brokers_take_the_direct_path(self) -> None:
        assert DirectPublisher.supports("redis://:pw@redis:6379/0")
        assert DirectPublisher.supports("rediss://redis:6380/0")
        assert not DirectPublisher.supports("sentinel://host:26379")


class TestOutboundQueue:
    def test_deliveries_travel_on_their_own_queue_which_a_worker_consumes_by_default(
        self, settings: Settings
    ) -> None:
        """A worker with no -Q consumes every declared queue, the outbound one included."""
        app = make_celery(settings)
        assert OUTBOUND_QUEUE in {q.name for q in app.conf.task_queues}
        assert app.conf.task_routes[DELIVER_CHANGE] == {"queue": OUTBOUND_QUEUE}
        enqueue_deliveries(app, [7, 8])
        client = redis.Redis.from_url(settings.redis_url)
        # LPUSHed, so the newest first; a message body is base64 JSON [args, kwargs, embed].
        bodies = [
            json.loads(base64.b64decode(json.loads(m)["body"]))
            for m in client.lrange(OUTBOUND_QUEUE, 0, -1)
        ]
        assert [body[0] for body in bodies] == [[8], [7]]
        client.close()
        app.close()
