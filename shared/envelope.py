"""The envelope every Dodo event shares, read once by the ingest to route, order and file it."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, NamedTuple

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


def customer_of_data(data: Any) -> str | None:
    """The customer an event's `data` is about: `customer.customer_id` or `customer_id`."""
    if not isinstance(data, dict):
        return None
    customer = data.get("customer")
    if isinstance(customer, dict) and isinstance(customer.get("customer_id"), str):
        return str(customer["customer_id"])
    found = data.get("customer_id")
    return found if isinstance(found, str) else None


def payment_of(envelope: Mapping[str, Any] | None) -> str | None:
    """The payment an event makes a customer's: a payment event's own, or that of an event
    that names no customer (a dispute). Others (a subscription's latest payment) are not
    trusted to say whose a payment is."""
    if not envelope:
        return None
    return payment_of_data(str(envelope.get("type", "")), envelope.get("data"))


def payment_of_data(event_type: str, data: Any) -> str | None:
    """`payment_of` for an envelope already taken apart (the ingest's `EnvelopeHead`)."""
    if not isinstance(data, dict) or not isinstance(data.get("payment_id"), str):
        return None
    if event_type.startswith("payment.") or customer_of_data(data) is None:
        return str(data["payment_id"])
    return None


# The width of `webhook_events.customer_id` and `.payment_id`.
SUBJECT_MAX = 255


class Subjects(NamedTuple):
    """Whose an event is, as `webhook_events` keeps it for the erasure to find it by index:
    its customer, and the payment it makes that customer's. None where the event names none,
    or one that does not fit the column: such an event is found by the erasure's scan."""

    customer_id: str | None
    payment_id: str | None


NO_SUBJECTS = Subjects(None, None)


def event_subjects(event_type: str, data: Any) -> Subjects:
    return Subjects(_fits(customer_of_data(data)), _fits(payment_of_data(event_type, data)))


def _fits(value: str | None) -> str | None:
    # A NUL or a lone surrogate (both valid JSON escapes) would fail the ingest's INSERT.
    if value is None or len(value) > SUBJECT_MAX or "\x00" in value:
        return None
    try:
        value.encode()
    except UnicodeEncodeError:
        return None
    return value
