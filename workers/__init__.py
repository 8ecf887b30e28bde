"""The Celery side: `celery -A workers worker|beat|flower`."""

from __future__ import annotations

from workers import tasks
from workers.app import app, settings

__all__ = ["app", "settings", "tasks"]
