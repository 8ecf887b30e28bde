"""What the database commands share: `--json` and `--database-url`, the settings those give,
the database (or one line naming DATABASE_URL when it does not answer), and the output."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from cli.errors import CommandError
from shared.settings import Settings, first_line, load_settings, redact_url

ERROR_WIDTH = 60
SCHEMA_HINT = " (is the schema up to date? run `dodo-webhooks db upgrade`)"


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON for programs")
    parser.add_argument("--database-url", help="instead of DATABASE_URL")


def settings_for(args: argparse.Namespace) -> Settings:
    """The settings (environment, `.env`), with `--database-url` over DATABASE_URL."""
    settings = load_settings()
    if getattr(args, "database_url", None):
        settings = settings.model_copy(update={"database_url": args.database_url})
    return settings


@contextmanager
def open_sessions(
    settings: Settings, *, probe: str = "SELECT 1"
) -> Iterator[sessionmaker[Session]]:
    """Sessions on DATABASE_URL once `probe` ran, or one line naming it (password hidden);
    a statement that fails on a missing table says to run the migrations."""
    from shared.db import make_engine, make_sessionmaker

    url = settings.database_url
    try:
        engine = make_engine(url)
        with engine.connect() as conn:
            conn.execute(text(probe))
    except Exception as exc:
        raise CommandError(
            f"DATABASE_URL: cannot reach the database at {redact_url(url)}: "
            f"{first_line(exc)}{_hint(exc)}"
        ) from None
    try:
        yield make_sessionmaker(engine)
    except DBAPIError as exc:
        raise CommandError(
            f"DATABASE_URL {redact_url(url)}: {first_line(exc)}{_hint(exc)}"
        ) from None
    finally:
        engine.dispose()


def _hint(exc: Exception) -> str:
    orig = str(getattr(exc, "orig", exc))
    return SCHEMA_HINT if "does not exist" in orig or "no such" in orig else ""


@contextmanager
def open_session(settings: Settings) -> Iterator[Session]:
    """One session on DATABASE_URL, as `open_sessions` gives them."""
    with open_sessions(settings) as factory, factory() as one:
        yield one


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


def short(error: str | None) -> str:
    """The first line of an error, cut to a table column."""
    if not error:
        return "-"
    line = error.splitlines()[0]
    return line if len(line) <= ERROR_WIDTH else line[: ERROR_WIDTH - 1] + "…"
