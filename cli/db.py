"""`dodo-webhooks db upgrade`: Alembic, driven from code so no alembic.ini is needed on disk."""

from __future__ import annotations

import argparse

from alembic import command
from alembic.config import Config

from cli.errors import CommandError
from shared.migrations import MIGRATIONS
from shared.settings import first_line, load_settings, redact_url


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    db = commands.add_parser("db", help="database schema (Alembic migrations)")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    up = db_commands.add_parser("upgrade", help="migrate the database to the latest schema")
    up.add_argument("revision", nargs="?", default="head")
    up.add_argument("--database-url", help="instead of DATABASE_URL")
    up.set_defaults(run=cmd_db_upgrade)


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    url = args.database_url or load_settings().database_url
    try:
        upgrade(url, args.revision)
    except Exception as exc:
        raise CommandError(
            f"DATABASE_URL: could not migrate {redact_url(url)}: {first_line(exc)}"
        ) from None
    print(f"database {redact_url(url)} is at revision {args.revision}")
    return 0


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def make_revision(database_url: str, message: str) -> None:
    """For developers: autogenerate a migration from the models."""
    command.revision(alembic_config(database_url), message=message, autogenerate=True)
