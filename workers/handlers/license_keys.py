"""Applying license keys events to the read model."""

from __future__ import annotations

from workers.handlers.base import Handler

ROUTES: dict[str, Handler] = {}
