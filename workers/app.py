"""The workers' Celery app, made once from the Settings: `celery -A workers`."""

from __future__ import annotations

import sys

from shared.logs import configure_logging
from shared.queue import make_celery
from shared.settings import ConfigError, get_settings

try:
    settings = get_settings()
    if settings.outbound_webhook_url:
        settings.require_outbound_secret()
except ConfigError as exc:
    # `celery -A workers` imports this module: one line, not a traceback.
    print(f"dodo-webhooks worker: {exc}", file=sys.stderr)
    raise SystemExit(2) from None

configure_logging(settings.log_level)
app = make_celery(settings)
