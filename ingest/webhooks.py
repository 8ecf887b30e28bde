"""POST /webhooks/dodo: verify, record, queue, answer — in that order."""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import Blueprint, Response, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from ingest.state import state
from ingest.verify import Rejection
from shared.envelope import NO_SUBJECTS, EnvelopeError, event_subjects, read_envelope_head
from shared.logs import get_logger, log_step

bp = Blueprint("webhooks", __name__)
log = get_logger("ingest")


@bp.post("/webhooks/dodo")
def receive() -> tuple[Response, int]:
    ingest = state()
    metrics = ingest.metrics
    metrics.received.inc()
    try:
        check_encoding()
        body = read_body(ingest.settings.max_body_bytes)
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

    event_type, event_at, dead_reason, subjects = None, None, None, NO_SUBJECTS
    try:
        head = read_envelope_head(body)
        event_type, event_at = head.type, head.timestamp
        # From the `data` just parsed: whose the event is, for an erasure to find it by.
        subjects = event_subjects(head.type, head.data)
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
            subjects=subjects,
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


# What Content-Encoding may say: Dodo, like every Standard Webhooks sender, posts plain JSON.
IDENTITY_ENCODINGS = ("", "identity")
READ_CHUNK = 64 * 1024
# A body refused unread is still on its way. Closing on it makes the kernel reset the
# connection, and a client still sending sees "broken pipe" instead of our answer (gunicorn
# drains 64 KiB only): read and drop this much of it first, in at most this long.
DRAIN_BYTES = 8 * 1024 * 1024
DRAIN_SECONDS = 2.0


def check_encoding() -> None:
    """A compressed body would be refused later as "not UTF-8" or a bad signature: say why."""
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in IDENTITY_ENCODINGS:
        discard_unread()
        raise Rejection(
            415,
            f"Content-Encoding {encoding[:40]} is not supported: send the JSON body uncompressed",
        )


def read_body(limit: int) -> bytes:
    """The raw body, however it is framed; a 413 naming the limit when it is longer."""
    too_large = Rejection(413, f"body over the limit of {limit} bytes (MAX_BODY_BYTES)")
    if request.content_length is not None:
        if request.content_length > limit:
            discard_unread()  # refused from the header; what is read now is only dropped
            raise too_large
        try:
            return request.get_data(cache=False)
        except RequestEntityTooLarge:
            raise too_large from None
    # Chunked, or a server that terminates the stream itself: no length up front. Werkzeug's
    # stream stops at MAX_CONTENT_LENGTH without a word (it raises only on a read past it),
    # which would cut the body and verify the cut: read one byte past the limit ourselves.
    request.max_content_length = limit + 1
    stream = request.stream
    body = bytearray()
    while len(body) <= limit:
        chunk = stream.read(min(READ_CHUNK, limit + 1 - len(body)))
        if not chunk:
            break
        body += chunk
    if len(body) > limit:
        discard_unread()
        raise too_large
    return bytes(body)


def discard_unread() -> None:
    """Drop what the client is still sending, within DRAIN_BYTES and DRAIN_SECONDS, so that it
    reads our refusal. A declared length past DRAIN_BYTES is answered at once."""
    declared = request.content_length
    if declared is not None and declared > DRAIN_BYTES:
        return
    # The server's own stream: it ends at the Content-Length or the last chunk.
    raw = request.environ["wsgi.input"]
    left = DRAIN_BYTES if declared is None else declared
    deadline = time.monotonic() + DRAIN_SECONDS
    try:
        while left > 0 and time.monotonic() < deadline:
            chunk = raw.read(min(READ_CHUNK, left))
            if not chunk:
                return
            left -= len(chunk)
    except Exception:
        # Whatever the client does to the rest of its body (a broken chunk, a hang-up), the
        # answer is the refusal already decided.
        return
