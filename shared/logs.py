"""One JSON line per step of an event's life; ids, types and counts only, never payloads."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonLineFormatter(logging.Formatter):
    # The second's text, formatted once per second: strftime was a tenth of a line's cost.
    _second: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": f"{self._utc_second(int(record.created))}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update({k: v for k, v in record.__dict__.items() if k not in _RESERVED})
        if record.exc_info and record.levelno >= logging.WARNING:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)

    def _utc_second(self, second: int) -> str:
        held, text = self._second  # one tuple, read and replaced whole: safe across threads
        if held != second:
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, text)
        return text


def configure_logging(level: str = "INFO") -> None:
    """Send the project's loggers to stderr as JSON lines (idempotent)."""
    logger = logging.getLogger("dodo_webhooks")
    if not any(getattr(h, "_dodo", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonLineFormatter())
        handler._dodo = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper())


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"dodo_webhooks.{name}")


def log_step(
    logger: logging.Logger, step: str, *, level: int = logging.INFO, **fields: Any
) -> None:
    """`step` is received, duplicate, rejected, queued, processing, processed, retry or dead."""
    logger.log(level, step, extra={"step": step, **fields})
