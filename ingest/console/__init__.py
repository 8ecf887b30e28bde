"""The operator console at /console/: server-rendered pages over the inbox and the read model."""

from __future__ import annotations

from flask import Flask

from ingest.console import auth, views
from ingest.console.blueprint import bp
from shared.settings import Settings

__all__ = ["init_console"]

# The routes are registered on `bp` by these modules; named so the imports are not unused.
_ROUTES = (auth, views)


def init_console(app: Flask, settings: Settings) -> None:
    """Mount the console unless CONSOLE_ENABLED is off: session, CSRF protection, blueprint."""
    if not settings.console_enabled:
        return
    auth.configure_sessions(app, settings)
    app.register_blueprint(bp)
