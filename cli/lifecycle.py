"""`dodo-webhooks purge` and `dodo-webhooks erase-customer`: retention and erasure, now."""

from __future__ import annotations

import argparse
import getpass
import socket
import sys
from collections.abc import Sequence

from cli.common import add_common, open_sessions, print_json, settings_for
from cli.errors import CommandError
from shared import lifecycle
from shared.lifecycle import ErasureError, PurgeResult


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    purge = commands.add_parser(
        "purge",
        help="remove raw bodies and headers older than RETENTION_DAYS, now",
        description="Run the retention job once: events processed or ignored more than "
        "RETENTION_DAYS ago lose their raw body and headers (the row and its webhook id stay, "
        "so a late duplicate is still recognised); dead letters keep theirs.",
    )
    purge.add_argument("--dry-run", action="store_true", help="count what would be purged")
    add_common(purge)
    purge.set_defaults(run=cmd_purge)

    erase = commands.add_parser(
        "erase-customer",
        help="erase a customer's personal data (GDPR), keeping ids, amounts and statuses",
        description="Remove the customer's names, emails, addresses, phone numbers, tax ids, "
        "card details and metadata from raw bodies, headers and the read model. Ids, amounts, "
        "statuses, timestamps and the credit ledger stay. The run is recorded (when, who, "
        "counts), never the data; events of this customer that arrive later are erased as "
        "the workers apply them.",
    )
    erase.add_argument("customer_id", metavar="CUS_ID")
    erase.add_argument("--dry-run", action="store_true", help="count what would be erased")
    add_common(erase)
    erase.set_defaults(run=cmd_erase_customer)


def cmd_purge(args: argparse.Namespace) -> int:
    settings = settings_for(args)
    if settings.retention_days <= 0:
        result = PurgeResult(settings.retention_days, None, args.dry_run)
    else:
        with open_sessions(settings) as factory:
            result = lifecycle.purge(
                factory,
                retention_days=settings.retention_days,
                batch_size=settings.purge_batch_size,
                dry_run=args.dry_run,
                pause_seconds=settings.purge_pause_seconds,
                progress=None if args.json else _purge_progress,
            )
        if not args.json and sys.stderr.isatty() and result.events:
            sys.stderr.write("\n")
    if args.json:
        print_json(result.as_json())
        return 0
    if result.cutoff is None:
        print("retention is off (RETENTION_DAYS=0): every raw body is kept; nothing purged")
        return 0
    verb = "would purge" if args.dry_run else "purged"
    print(
        table(
            [
                ("RETENTION", f"{result.retention_days} days"),
                ("PROCESSED BEFORE", result.cutoff.strftime("%Y-%m-%d %H:%M:%SZ")),
                (f"EVENTS {verb.upper()}", str(result.events)),
                (f"BYTES {verb.upper()}", f"{result.bytes} ({human_bytes(result.bytes)})"),
                (f"DAYS {verb.upper()}", str(result.days)),
            ]
        )
    )
    if args.dry_run:
        print("dry run: nothing changed")
    return 0


def _purge_progress(result: PurgeResult) -> None:
    if sys.stderr.isatty():
        sys.stderr.write(f"\rpurged {result.events} event(s), {human_bytes(result.bytes)} so far…")
        sys.stderr.flush()


def cmd_erase_customer(args: argparse.Namespace) -> int:
    settings = settings_for(args)
    who = f"cli:{getpass.getuser()}@{socket.gethostname()}"
    try:
        customer_id = lifecycle.check_customer_id(args.customer_id)
        with open_sessions(settings) as factory:
            if sys.stderr.isatty() and not args.json:
                sys.stderr.write(f"searching the events of {customer_id}…\n")
            result = lifecycle.erase_customer(
                factory, customer_id, dry_run=args.dry_run, requested_by=who
            )
    except ErasureError as exc:
        raise CommandError(str(exc)) from None
    if args.json:
        print_json(result.as_json())
        return 0
    rows = [("TABLE", "ROWS", "WOULD CHANGE" if args.dry_run else "CHANGED")]
    rows += [(name, str(c.rows), str(c.changed)) for name, c in result.counts.items()]
    print(table(rows))
    if not result.found:
        print(f"no data of customer {customer_id} found")
    if args.dry_run:
        print("dry run: nothing changed, nothing recorded")
    else:
        print(
            f"customer {customer_id} erased (erasure #{result.erasure_id}); events of this "
            "customer that arrive later are erased as they are applied"
        )
    return 0


def table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"
