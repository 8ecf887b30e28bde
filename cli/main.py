"""`dodo-webhooks`: the command line's parser and its one-line error handling."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from cli import changes, db, dev, dlq, lifecycle, reconcile, sendtest
from cli.errors import CommandError
from shared.settings import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dodo-webhooks",
        description="Self-hosted processor for Dodo Payments webhooks.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (db, dev, sendtest, dlq, changes, reconcile, lifecycle):
        module.register(commands)
    return parser


# What a shell reports for a command killed by SIGPIPE, as `seq 1000000 | head` is.
OUTPUT_CLOSED = 128 + 13


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = run(argv)
        # A reader that went away (`| head`) shows here rather than in Python's flush at exit.
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        return output_closed()
    except KeyboardInterrupt:
        return 130


def run(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse, after --help or a usage error
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    try:
        return int(args.run(args))
    except (ConfigError, CommandError) as exc:
        print(f"dodo-webhooks: {exc}", file=sys.stderr)
        return 1


def output_closed() -> int:
    """The reader of our output is gone: stop without a word, as `seq … | head` does."""
    # Python flushes stdout once more at exit; pointed at /dev/null that flush has nowhere to
    # fail. (SIGPIPE's default action is no option: `dev` writes to sockets too.)
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return OUTPUT_CLOSED


if __name__ == "__main__":
    sys.exit(main())
