"""Flower's config file, read from the working directory by `celery -A workers flower`.

Flower serves its dashboard to anyone when no authentication is configured; this refuses to.
Credentials: FLOWER_BASIC_AUTH=user:password[,user2:password2] in the environment (Flower reads
it natively), or in ./.env like every other setting, or `--basic-auth=` on the command line.
"""

from __future__ import annotations

import os
import sys

from dotenv import dotenv_values
from tornado.options import options

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
