"""Typed Dodo events: one frozen pydantic model per handled type, validated by the worker."""

from __future__ import annotations

from pydantic import BaseModel, ValidationError

from shared.envelope import describe_validation_error

# event type -> its model; filled in by the read-model work. A type missing here is ignored.
SCHEMAS: dict[str, type[BaseModel]] = {}


class EventValidationError(ValueError):
    """The payload of a handled type does not validate: the event is dead at once."""


def parse_event(event_type: str, body: bytes) -> BaseModel | None:
    """The typed event, or None when no model is known for this type (it is ignored)."""
    model = SCHEMAS.get(event_type)
    if model is None:
        return None
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise EventValidationError(describe_validation_error(exc)) from None
