"""The envelope every Dodo event shares, read cheaply by the ingest to route and order it."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, StringConstraints, ValidationError

# Printable, no whitespace: a type string goes into a column, a queue choice and log lines.
EventType = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"^[!-~]+$")]


class EnvelopeError(ValueError):
    """A verified body that is not a Dodo event envelope; the reason is kept on the dead event."""


class EnvelopeHead(BaseModel):
    """`{"business_id", "type", "timestamp", "data"}`; `data` is checked by the worker."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    business_id: str
    type: EventType
    timestamp: AwareDatetime
    data: dict[str, Any]


def read_envelope_head(body: bytes) -> EnvelopeHead:
    try:
        return EnvelopeHead.model_validate_json(body)
    except ValidationError as exc:
        raise EnvelopeError(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError, *, limit: int = 3) -> str:
    """A short reason naming the fields, without echoing the values (they may be customer data)."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:limit]:
        where = ".".join(str(p) for p in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    more = exc.error_count() - limit
    if more > 0:
        parts.append(f"(+{more} more)")
    return "invalid event: " + "; ".join(parts)


_SAFE_ID = re.compile(r"^[\x21-\x7e]{1,255}$")


def is_safe_webhook_id(value: str) -> bool:
    """A delivery id we can use as a key and print in a log line: printable ASCII, ≤255."""
    return bool(_SAFE_ID.match(value))


def event_sort_key(
    event_at: datetime, webhook_ts: int, webhook_id: str
) -> tuple[datetime, int, str]:
    """Occurrence order: envelope timestamp, then `webhook-timestamp`, then `webhook-id`."""
    return (event_at, webhook_ts, webhook_id)
