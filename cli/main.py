"""`dodo-webhooks`: the command line's parser and its one-line error handling."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cli import changes, db, dev, dlq, sendtest
from cli.errors import CommandError
from shared.settings import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dodo-webhooks",
        description="Self-hosted processor for Dodo Payments webhooks.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (db, dev, sendtest, dlq, changes):
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
