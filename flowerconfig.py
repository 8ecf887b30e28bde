"""Flower's config file, read from the working directory by `celery -A workers flower`.

Flower serves its dashboard to anyone when no authentication is configured; this refuses to.
Credentials: FLOWER_BASIC_AUTH=user:password[,user2:password2] in the environment (Flower reads
it natively), or in ./.env like every other setting, or `--basic-auth=` on the command line.
"""

from __future__ import annotations

import os
import sys

from dotenv import dotenv_values
from flower.views.monitor import Metrics
from tornado.options import options
from tornado.web import authenticated


def _require_login_for_metrics() -> None:
    # Flower 2.x answers /metrics without asking for credentials, unlike every other page.
    # Prometheus can send basic auth; /healthcheck stays open for Docker's health check.
    if not getattr(Metrics.get, "__wrapped__", None):
        Metrics.get = authenticated(Metrics.get)  # type: ignore[method-assign]


# Flower applies the environment and the command line before reading this file.
if not (options.basic_auth or options.auth):
    from_dotenv = dotenv_values(".env").get("FLOWER_BASIC_AUTH") if os.path.exists(".env") else None
    if from_dotenv:
        # Names set here override the environment, so this only fills in what is missing.
        basic_auth = [part.strip() for part in from_dotenv.split(",") if part.strip()]
    else:
        print(
            "dodo-webhooks flower: FLOWER_BASIC_AUTH is not set: give user:password "
            "(Flower would otherwise serve the dashboard without authentication)",
            file=sys.stderr,
        )
        raise SystemExit(2)

_require_login_for_metrics()
