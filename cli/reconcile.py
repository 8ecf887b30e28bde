"""`dodo-webhooks reconcile`: compare the read model with Dodo's API and record what differs."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cli.common import add_common, open_sessions, settings_for
from cli.errors import CommandError
from shared.reconcile import (
    FAMILIES,
    Difference,
    Progress,
    ReconcileError,
    Report,
    parse_families,
    parse_since,
    reconcile,
)
from shared.settings import Settings

# Differences printed for people; --json has them all.
SHOWN_DIFFERENCES = 50
# Before the first call to Dodo's API: the database answers, and has the schema.
SCHEMA_PROBE = "SELECT 1 FROM webhook_events LIMIT 1"


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "reconcile",
        help="backfill and heal the read model from Dodo's API",
        description="List payments, refunds, disputes, subscriptions, license keys and credit "
        "ledgers through Dodo's API (DODO_PAYMENTS_API_KEY), compare them with the read model "
        "on DATABASE_URL, and record each missing or differing object as a synthetic event, "
        "queued on REDIS_URL and applied by the workers like any delivery.",
    )
    parser.add_argument(
        "--family",
        metavar="LIST",
        help=f"comma-separated, from {','.join(FAMILIES)} (default: all)",
    )
    parser.add_argument("--since", metavar="DATE", help="only objects created at or after (UTC)")
    parser.add_argument("--customer", metavar="CUS_ID", help="only this customer's objects")
    parser.add_argument(
        "--dry-run", action="store_true", help="show the differences; write and queue nothing"
    )
    add_common(parser)
    parser.set_defaults(run=cmd_reconcile)


def cmd_reconcile(args: argparse.Namespace) -> int:
    settings = settings_for(args)
    try:
        families = parse_families(args.family)
        since = parse_since(args.since)
    except ReconcileError as exc:
        raise CommandError(str(exc)) from None
    with (
        open_sessions(settings, probe=SCHEMA_PROBE) as sessions,
        _queue(settings, args.dry_run) as wake,
    ):
        # Bars for a person at a terminal; a pipe or a log gets the table only.
        progress: Progress = _Bars() if sys.stderr.isatty() and not args.json else Progress()
        try:
            with progress if isinstance(progress, _Bars) else _nothing():
                report = reconcile(
                    settings,
                    sessions,
                    wake=wake,
                    families=families,
                    since=since,
                    customer_id=args.customer,
                    dry_run=args.dry_run,
                    progress=progress,
                )
        except ReconcileError as exc:
            raise CommandError(str(exc)) from None
    if args.json:
        json.dump(report.as_json(), sys.stdout, indent=2, ensure_ascii=False, default=str)
        sys.stdout.write("\n")
    else:
        print(summary(report))
    # A malformed object skipped, Redis away, a window past the cap: said, and not a success.
    return 1 if report.problems else 0


def summary(report: Report) -> str:
    """The table for people, the differences (a dry run's point), and the problems."""
    rows: list[tuple[str, ...]] = [
        ("FAMILY", "LISTED", "MISSING", "DIFFERS", "RECORDED", "MALFORMED")
    ]
    for name in report.families:
        c = report.counts[name]
        rows.append(
            (name, *(str(v) for v in (c.listed, c.missing, c.differs, c.recorded, c.malformed)))
        )
    rows.append(
        (
            "total",
            *(
                str(report.total(n))
                for n in ("listed", "missing", "differs", "recorded", "malformed")
            ),
        )
    )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    if report.differences and (report.dry_run or len(report.differences) <= SHOWN_DIFFERENCES):
        lines.append("")
        for difference in report.differences[:SHOWN_DIFFERENCES]:
            lines.append(describe(difference))
        if len(report.differences) > SHOWN_DIFFERENCES:
            lines.append(f"… and {len(report.differences) - SHOWN_DIFFERENCES} more (--json)")
    lines.append("")
    if report.dry_run:
        lines.append(f"dry run: nothing recorded; {report.api_calls} API call(s)")
    else:
        lines.append(
            f"{report.total('recorded')} event(s) recorded, {report.queued} queued; "
            f"{report.api_calls} API call(s)"
        )
    lines.extend(f"problem: {p}" for p in report.problems)
    return "\n".join(lines)


def describe(difference: Difference) -> str:
    if difference.change == "missing":
        return f"{difference.family} {difference.id}: missing locally"
    changes = ", ".join(
        f"{name} {local!r} -> {api!r}" for name, (local, api) in difference.fields.items()
    )
    return f"{difference.family} {difference.id}: {changes}"


class _Bars(Progress):
    """A bar per family on stderr (rich): the created_at range covered, or accounts read."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        self._bars = RichProgress(
            TextColumn("{task.description:<13}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[listed]} listed"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> _Bars:
        self._bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bars.stop()

    def start(self, family: str, total: float | None) -> None:
        self._tasks[family] = self._bars.add_task(family, total=total, listed=0)

    def advance(self, family: str, amount: float, *, listed: int) -> None:
        self._bars.update(self._tasks[family], advance=amount, listed=listed)

    def finish(self, family: str) -> None:
        task = self._tasks.get(family)
        if task is not None:
            total = self._bars.tasks[task].total
            self._bars.update(task, total=total or 1, completed=total or 1)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextmanager
def _queue(settings: Settings, dry_run: bool) -> Iterator[Any]:
    """The work signal for each page of recorded events: a drain of its queue, which applies
    them in batches; when Redis is away the events stay pending and beat's re-drive queues
    them."""
    if dry_run:
        yield None
        return
    from shared.queue import make_celery, send_drain

    celery = make_celery(settings)
    celery.conf.task_publish_retry = False
    celery.conf.broker_connection_timeout = 2
    try:
        yield lambda queue: send_drain(celery, queue, retry=False)
    finally:
        celery.close()
