"""`dodo-webhooks`: the command line (dev, send-test, dlq, db)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from shared.settings import ConfigError, first_line, load_settings, redact_url

Command = Callable[[argparse.Namespace], int]


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from shared.migrate import upgrade

    settings = load_settings()
    url = args.database_url or settings.database_url
    try:
        upgrade(url, args.revision)
    except Exception as exc:
        raise CommandError(
            f"DATABASE_URL: could not migrate {redact_url(url)}: {first_line(exc)}"
        ) from None
    print(f"database {redact_url(url)} is at revision {args.revision}")
    return 0


class CommandError(Exception):
    """Printed as one line, exit status 1."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dodo-webhooks",
        description="Self-hosted processor for Dodo Payments webhooks.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    db = commands.add_parser("db", help="database schema (Alembic migrations)")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    up = db_commands.add_parser("upgrade", help="migrate the database to the latest schema")
    up.add_argument("revision", nargs="?", default="head")
    up.add_argument("--database-url", help="instead of DATABASE_URL")
    up.set_defaults(run=cmd_db_upgrade)

    # Imported here: each of them imports CommandError from this module.
    from shared import devserver, dlq_cli, sendtest

    for module in (devserver, sendtest, dlq_cli):
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (ConfigError, CommandError) as exc:
        print(f"dodo-webhooks: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
