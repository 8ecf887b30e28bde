"""Building typed events and their deliveries from the SDK-checked samples."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from cli.samples import sample_event
from shared.db import make_sessionmaker, transaction
from shared.models import Base, Outcome
from workers.handlers import ROUTES, Delivery
from workers.schemas import Envelope, parse_event

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
_ids = itertools.count(1)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def make_body(event_type: str, *, when: datetime = T0, **data: Any) -> dict[str, Any]:
    """The sample envelope of `event_type` at `when`, with `data` fields overridden."""
    return sample_event(
        event_type, timestamp=when, overrides={f"data.{k}": v for k, v in data.items()}
    )


def make_event(
    event_type: str,
    *,
    when: datetime = T0,
    webhook_id: str | None = None,
    webhook_ts: int | None = None,
    **data: Any,
) -> tuple[Envelope, Delivery]:
    """A validated event and the delivery that brought it (ids unique unless given)."""
    body = make_body(event_type, when=when, **data)
    event = parse_event(event_type, json.dumps(body).encode())
    assert event is not None, f"{event_type} has no schema"
    delivery = Delivery(
        webhook_id=webhook_id or f"msg_{next(_ids):06d}",
        webhook_ts=int(when.timestamp()) if webhook_ts is None else webhook_ts,
        event_at=event.timestamp,
    )
    return event, delivery


def apply(factory: sessionmaker[Session], event: Envelope, delivery: Delivery) -> Outcome:
    """Route and apply one event in its own committed transaction, as the worker does."""
    with transaction(factory) as session:
        return ROUTES[event.type](session, event, delivery)  # type: ignore[attr-defined]


def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_sessionmaker(engine)


def count(factory: sessionmaker[Session], model: type[Base]) -> int:
    with factory() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def apply_body(
    factory: sessionmaker[Session], body: dict[str, Any], delivery: Delivery
) -> Outcome | None:
    """Parse then apply a raw envelope in one transaction, as `workers.tasks.apply_event` does."""
    with transaction(factory) as session:
        event = parse_event(body["type"], json.dumps(body).encode())
        if event is None:
            return None
        return ROUTES[body["type"]](session, event, delivery)


def delivery_for(webhook_id: str, when: datetime = T0) -> Delivery:
    return Delivery(webhook_id=webhook_id, webhook_ts=int(when.timestamp()), event_at=when)


class WriteThenFail(RuntimeError):
    """Raised inside the transaction after the handler wrote: what a later failure does."""


def apply_then_fail(
    factory: sessionmaker[Session], event: Envelope, delivery: Delivery, *models: type[Base]
) -> list[int]:
    """Apply in a transaction that then fails; how many rows of each model it held before.

    The handler never commits: the caller checks that what it wrote went with the rollback.
    """
    seen: list[int] = []
    try:
        with transaction(factory) as session:
            ROUTES[event.type](session, event, delivery)  # type: ignore[attr-defined]
            for model in models:
                seen.append(int(session.scalar(select(func.count()).select_from(model)) or 0))
            raise WriteThenFail("the event row could not be marked final")
    except WriteThenFail:
        pass
    return seen
