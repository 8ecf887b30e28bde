"""The retry policy: what a failure is, and how long to wait before the next attempt."""

from __future__ import annotations

import enum
import random

import sqlalchemy.exc
from kombu.exceptions import OperationalError as BrokerUnavailable
from redis.exceptions import RedisError

from shared.envelope import EnvelopeError
from shared.settings import Settings
from workers.schemas import EventValidationError


class Failure(enum.StrEnum):
    """What an attempt's error says about the next attempt; the retry log line names it."""

    # Retrying cannot change the verdict on the same bytes: dead at once.
    PERMANENT = "permanent"
    # Database or broker unavailable, deadlock, serialization failure: worth waiting for.
    TRANSIENT = "transient"
    # Anything else (a handler meeting a row not there yet, a bug): retried all the same,
    # up to MAX_ATTEMPTS.
    UNEXPECTED = "unexpected"


def classify(exc: BaseException) -> Failure:
    if isinstance(exc, EventValidationError | EnvelopeError):
        return Failure.PERMANENT
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        unavailable = exc.connection_invalidated or isinstance(exc, sqlalchemy.exc.OperationalError)
        return Failure.TRANSIENT if unavailable else Failure.UNEXPECTED
    if isinstance(
        exc, RedisError | BrokerUnavailable | sqlalchemy.exc.TimeoutError | ConnectionError
    ):
        return Failure.TRANSIENT
    return Failure.UNEXPECTED


def backoff_seconds(attempt: int, config: Settings) -> float:
    """Exponential with jitter (between half and all of the step), capped below the broker's
    visibility timeout: Redis would hand a countdown held longer to a second worker."""
    cap = min(config.retry_backoff_max_seconds, config.broker_visibility_timeout // 2)
    ceiling = min(cap, config.retry_backoff_base_seconds * 2 ** (attempt - 1))
    return random.uniform(ceiling / 2, ceiling)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
