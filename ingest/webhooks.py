"""POST /webhooks/dodo: verify, record, queue, answer — in that order."""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Response, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from ingest.state import state
from ingest.verify import Rejection
from shared.envelope import EnvelopeError, read_envelope_head
from shared.logs import get_logger, log_step

bp = Blueprint("webhooks", __name__)
log = get_logger("ingest")


@bp.post("/webhooks/dodo")
def receive() -> tuple[Response, int]:
    ingest = state()
    metrics = ingest.metrics
    metrics.received.inc()
    try:
        body = request.get_data(cache=False)  # 413 past MAX_CONTENT_LENGTH, before reading it all
    except RequestEntityTooLarge:
        metrics.rejected.labels(reason="413").inc()
        raise
    try:
        delivery = ingest.verifier.verify(body, dict(request.headers.items(lower=True)))
    except Rejection as rejection:
        metrics.rejected.labels(reason=str(rejection.status)).inc()
        log_step(
            log,
            "rejected",
            level=logging.INFO,
            http_status=rejection.status,
            reason=rejection.reason,
        )
        return jsonify(error=rejection.reason), rejection.status

    event_type, event_at, dead_reason = None, None, None
    try:
        head = read_envelope_head(body)
        event_type, event_at = head.type, head.timestamp
    except EnvelopeError as exc:
        # Signed by Dodo, so kept: it goes dead with the reason, for an operator to look at.
        dead_reason = str(exc)

    try:
        created = ingest.recorder.record(
            webhook_id=delivery.webhook_id,
            webhook_ts=delivery.webhook_ts,
            headers=delivery.headers,
            body=body,
            event_type=event_type,
            event_at=event_at,
            dead_reason=dead_reason,
        )
    except Exception:
        metrics.record_failures.inc()
        log.error(
            "could not record delivery",
            exc_info=True,
            extra={"step": "unavailable", "webhook_id": delivery.webhook_id},
        )
        return jsonify(error="the event could not be recorded; retry later"), 503

    fields: dict[str, Any] = {"webhook_id": delivery.webhook_id, "type": event_type}
    if not created:
        metrics.duplicates.inc()
        log_step(log, "duplicate", **fields)
        return jsonify(status="duplicate", webhook_id=delivery.webhook_id), 200
    if dead_reason:
        metrics.dead_on_arrival.inc()
        log_step(log, "dead", level=logging.WARNING, reason=dead_reason, **fields)
        return jsonify(status="dead", webhook_id=delivery.webhook_id, error=dead_reason), 202

    # One line at INFO per delivery (queued, deferred or queue_failed): each costs about
    # 30 µs of a worker's CPU, a tenth of what recording it does.
    log_step(log, "received", level=logging.DEBUG, **fields)
    try:
        sent = ingest.signal.send(delivery.webhook_id, event_type)
    except Exception:
        sent = False
        log.warning(
            "could not queue; beat's re-drive will",
            exc_info=True,
            extra={"step": "queue_failed", **fields},
        )
    else:
        # `deferred`: not sent, as Redis failed a moment ago (the ingest's quiet period).
        log_step(log, "queued" if sent else "deferred", **fields)
    if sent:
        metrics.queued.inc()
    else:
        # Recorded durably already: beat's re-drive queues it once Redis answers.
        metrics.deferred.inc()
    return jsonify(status="queued", webhook_id=delivery.webhook_id), 202
