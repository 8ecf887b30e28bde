"""One Settings object read from the environment (and a `.env` file)."""

from __future__ import annotations

import base64
import binascii
import re
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from standardwebhooks.webhooks import Webhook

DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@localhost:5432/dodo_webhooks"


class ConfigError(Exception):
    """A misconfiguration, explained in one line that names the variable."""


def parse_secrets(value: str | list[str] | None) -> list[str]:
    """Split `whsec_a whsec_b` or `whsec_a,whsec_b` and check that each one decodes."""
    if value is None:
        return []
    parts = value if isinstance(value, list) else re.split(r"[\s,]+", value)
    secrets = [part.strip() for part in parts if part.strip()]
    for position, secret in enumerate(secrets, start=1):
        problem = _secret_problem(secret)
        if problem:
            raise ValueError(
                f"secret #{position} is not a valid Standard Webhooks secret "
                f"(expected whsec_<base64>): {problem}"
            )
    return secrets


def parse_urls(value: str | list[str] | None) -> list[str]:
    """Split `http://a/x http://b/y`; each must be an absolute http(s) URL."""
    if value is None:
        return []
    parts = value if isinstance(value, list) else re.split(r"\s+", value)
    urls = [part.strip() for part in parts if part.strip()]
    for position, url in enumerate(urls, start=1):
        if not re.match(r"^https?://[^/\s]+", url):
            raise ValueError(f"URL #{position} is not an absolute http(s) URL: {url[:80]!r}")
    return list(dict.fromkeys(urls))


def _secret_problem(secret: str) -> str | None:
    # The library decodes leniently (it drops characters that are not base64), so a typo
    # would silently become another key: check strictly here, once, at start.
    if not secret.startswith("whsec_"):
        return "it does not start with whsec_"
    encoded = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        return "the part after whsec_ is not base64"
    if len(key) < 16:
        # An empty or tiny key verifies signatures anyone can forge.
        return "the key is shorter than 16 bytes"
    Webhook(secret)
    return None


class Settings(BaseSettings):
    """Configuration; every field is an environment variable of the same name in upper case."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    dodo_payments_webhook_key: Annotated[list[str], NoDecode] = Field(default_factory=list)
    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str = "redis://localhost:6379/0"
    admin_token: str | None = None
    max_attempts: int = Field(default=8, ge=1, le=100)

    # Not in the public contract, but worth tuning.
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    # A claimed event whose worker has not finished after this long is re-driven.
    lease_seconds: int = Field(default=300, ge=1)
    # A claim older than this whose event row no transaction holds is taken back by beat's
    # re-drive: its worker died (a live one holds the row from its first statement on).
    reclaim_after_seconds: int = Field(default=20, ge=1)
    # Pending/retrying events older than this without progress are queued again by beat.
    redrive_after_seconds: int = Field(default=60, ge=1)
    redrive_interval_seconds: float = Field(default=15.0, gt=0)
    retry_backoff_base_seconds: float = Field(default=2.0, gt=0)
    retry_backoff_max_seconds: int = Field(default=600, ge=1)
    # Redis redelivers an unacknowledged message after this; kept above the backoff cap.
    broker_visibility_timeout: int = Field(default=3600, ge=60)
    # Where `celery beat` keeps its schedule; relative to the working directory (Celery's
    # default). A read-only container points it at a tmpfs, e.g. /tmp/celerybeat-schedule.
    beat_schedule_file: str = "celerybeat-schedule"
    log_level: str = "INFO"

    # The operator console at /console/ (ingest/console): on by default, signed in with
    # ADMIN_TOKEN. Its session cookie is signed with CONSOLE_SECRET_KEY, or a key derived
    # from ADMIN_TOKEN when unset (changing the token then signs everyone out).
    console_enabled: bool = True
    console_secret_key: str | None = None
    console_session_hours: float = Field(default=12.0, gt=0)
    # A one-time sign-in link's token (`dodo-webhooks dev` sets it): /console/login?once=….
    console_login_token: str | None = None

    # Reconciliation and backfill from Dodo's API (DESIGN.md), named as the official SDK's.
    dodo_payments_api_key: str | None = None
    dodo_payments_environment: Literal["live_mode", "test_mode"] = "live_mode"
    dodo_payments_base_url: str | None = None
    # Beat runs `reconcile` this often; 0 (the default) leaves it to the command.
    reconcile_interval_seconds: float = Field(default=0.0, ge=0)
    # Requests a reconciliation sends Dodo's API per second at most (retries included).
    reconcile_requests_per_second: float = Field(default=10.0, gt=0)
    # Data lifecycle (shared/lifecycle.py). Processed and ignored events lose their raw body
    # and headers this many days after processing finished; 0 keeps everything.
    retention_days: int = Field(default=30, ge=0, le=36500)
    # The purge: rows per transaction (each a short lock on only those rows), how often beat
    # starts it, and how long one run may go on before it hands over to the next.
    purge_batch_size: int = Field(default=500, ge=1, le=10000)
    purge_interval_seconds: float = Field(default=600.0, gt=0)
    purge_run_seconds: float = Field(default=60.0, gt=0)
    # A pause after each batch, so a long purge leaves the database to the ingest.
    purge_pause_seconds: float = Field(default=1.0, ge=0, le=60)
    # The change feed's push (DESIGN.md "Change feed").
    outbound_webhook_url: Annotated[list[str], NoDecode] = Field(default_factory=list)
    outbound_webhook_secret: Annotated[list[str], NoDecode] = Field(default_factory=list)
    outbound_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    outbound_max_attempts: int = Field(default=12, ge=1, le=100)
    outbound_backoff_base_seconds: float = Field(default=2.0, gt=0)
    outbound_backoff_max_seconds: int = Field(default=600, ge=1)

    @field_validator("outbound_webhook_url", mode="before")
    @classmethod
    def _split_urls(cls, value: str | list[str] | None) -> list[str]:
        return parse_urls(value)

    @field_validator("outbound_webhook_secret", mode="before")
    @classmethod
    def _split_outbound_secrets(cls, value: str | list[str] | None) -> list[str]:
        return parse_secrets(value)

    def require_outbound_secret(self) -> str:
        """The secret outbound changes are signed with: the first one given."""
        if not self.outbound_webhook_secret:
            raise ConfigError(
                "OUTBOUND_WEBHOOK_SECRET is not set: OUTBOUND_WEBHOOK_URL needs a whsec_… "
                "secret to sign the changes with"
            )
        return self.outbound_webhook_secret[0]

    # Draining (workers/tasks.py `drain`): how many ready events one claim takes at most,
    # and how long one drain task runs before it hands its queue to the next message, so
    # that a worker serving several queues turns to the others during a long backlog.
    drain_batch_size: int = Field(default=100, ge=1, le=1000)
    drain_budget_seconds: float = Field(default=1.0, gt=0)

    @field_validator("dodo_payments_webhook_key", mode="before")
    @classmethod
    def _split_secrets(cls, value: str | list[str] | None) -> list[str]:
        return parse_secrets(value)

    @field_validator(
        "admin_token",
        "console_secret_key",
        "console_login_token",
        "dodo_payments_api_key",
        "dodo_payments_base_url",
    )
    @classmethod
    def _blank_token_is_unset(cls, value: str | None) -> str | None:
        return value or None

    def require_webhook_key(self) -> list[str]:
        if not self.dodo_payments_webhook_key:
            raise ConfigError(
                "DODO_PAYMENTS_WEBHOOK_KEY is not set: give one or more whsec_… secrets "
                "(Dodo dashboard → Webhooks → signing secret)"
            )
        return self.dodo_payments_webhook_key


def first_line(exc: BaseException) -> str:
    """`Type: first line of the message` — enough for an operator, never a traceback."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def redact_url(url: str) -> str:
    """A URL fit for a terminal or a log: the password hidden."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def load_settings(**overrides: object) -> Settings:
    """Build Settings, turning a validation error into one ConfigError line naming the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]).upper() if first["loc"] else "configuration"
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{name}: {message}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
