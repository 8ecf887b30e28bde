"""`dodo-webhooks dlq list|show|retry`: the dead letters, straight from the database."""

from __future__ import annotations

import argparse
import json
from contextlib import suppress
from typing import Any

from sqlalchemy import select

from cli.common import add_common, open_session, print_json, settings_for, short
from cli.errors import CommandError
from shared import deadletters
from shared.bodies import fill
from shared.deadletters import FilterError
from shared.models import EventStatus, WebhookEvent, isoformat
from shared.settings import Settings


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dlq = commands.add_parser(
        "dlq",
        help="dead letters: list, show and retry events that gave up",
        description="Dead letters, read from DATABASE_URL; a retry queues them on REDIS_URL.",
    )
    actions = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="dead events, newest first")
    _add_filters(listing)
    listing.add_argument(
        "--limit",
        default=deadletters.DEFAULT_LIMIT,
        help=f"at most this many (default {deadletters.DEFAULT_LIMIT}, max "
        f"{deadletters.MAX_LIMIT})",
    )
    listing.set_defaults(run=cmd_list)

    show = actions.add_parser("show", help="one or more dead events in full (headers, body)")
    show.add_argument("ids", nargs="+", metavar="WEBHOOK_ID")
    add_common(show)
    show.set_defaults(run=cmd_show)

    retry = actions.add_parser(
        "retry",
        help="put dead events back to pending and queue them (same path, same idempotency)",
        description="Retry the dead events named by ids and/or filters. With no id and no "
        "filter, --all is required.",
    )
    retry.add_argument("ids", nargs="*", metavar="WEBHOOK_ID")
    _add_filters(retry)
    retry.add_argument("--all", action="store_true", help="every dead event (no filter)")
    retry.add_argument("--dry-run", action="store_true", help="count what would be retried")
    retry.set_defaults(run=cmd_retry)


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--type", dest="type_glob", metavar="GLOB", help="e.g. 'subscription.*'")
    parser.add_argument(
        "--since", metavar="WHEN", help="received at or after: ISO-8601 time or date, or 2h, 7d"
    )
    parser.add_argument("--until", metavar="WHEN", help="received before (same forms)")
    add_common(parser)


def cmd_list(args: argparse.Namespace) -> int:
    settings = settings_for(args)
    filters = _filters(args)
    with open_session(settings) as session:
        try:
            limit = deadletters.parse_limit(args.limit)
            events = deadletters.list_dead(session, limit=limit, **filters)
            total = deadletters.count_dead(session, **filters)
        except FilterError as exc:
            raise CommandError(str(exc)) from None
    if args.json:
        print_json({"total": total, "dead_letters": [e.summary() for e in events]})
        return 0
    if events:
        print(table(events))
    shown = f"{len(events)} of {total}" if total > len(events) else str(total)
    print(
        f"{shown} dead letter(s)" + (" (raise --limit to see more)" if total > len(events) else "")
    )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    settings = settings_for(args)
    with open_session(settings) as session:
        found = session.scalars(select(WebhookEvent).where(WebhookEvent.webhook_id.in_(args.ids)))
        events = {event.webhook_id: event for event in found}
        fill(session, list(events.values()))
    missing = [i for i in args.ids if i not in events]
    if args.json:
        print_json([events[i].detail() for i in args.ids if i in events])
    else:
        for position, webhook_id in enumerate(i for i in args.ids if i in events):
            if position:
                print()
            print(describe(events[webhook_id]))
    if missing:
        raise CommandError(f"no event with webhook id {', '.join(missing)}")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    settings = settings_for(args)
    filters = _filters(args)
    with open_session(settings) as session:
        try:
            with session.begin():
                result = deadletters.requeue_dead(
                    session, everything=args.all, dry_run=args.dry_run, **filters
                )
        except FilterError as exc:
            raise CommandError(str(exc)) from None
    sent = None
    if result.requeued:
        # After the commit: a worker that picks the message up must find the event pending.
        sent = _enqueue(settings, result.requeued)
    notes = deadletters.requeue_notes(
        result, sent, redrive_after_seconds=settings.redrive_after_seconds
    )
    if args.json:
        print_json(
            {
                "matched": result.matched,
                "requeued": len(result.requeued),
                "queued": sent.queued if sent else 0,
                "dry_run": args.dry_run,
                "ids": result.ids,
                "notes": notes,
            }
        )
    else:
        if args.dry_run:
            print(f"dry run: {result.matched} dead letter(s) would be retried; nothing changed")
        else:
            queued = sent.queued if sent else 0
            print(
                f"{result.matched} dead letter(s) matched, {len(result.requeued)} set pending, "
                f"{queued} queued"
            )
        for note in notes:
            print(f"note: {note}")
    return 0


def _enqueue(settings: Settings, requeued: list[tuple[str, str | None]]) -> deadletters.Sent:
    """Queue on REDIS_URL; when Redis is away, say so at once instead of retrying for seconds:
    the events are pending already and the re-drive job queues them."""
    import redis

    from shared.queue import make_celery

    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=2)
    celery = make_celery(settings)
    celery.conf.task_publish_retry = False
    celery.conf.broker_connection_timeout = 2
    try:
        return deadletters.enqueue_requeued(celery, requeued, ping=client.ping)
    finally:
        celery.close()
        client.close()


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    ids = getattr(args, "ids", None) or None
    return {"type_glob": args.type_glob, "since": args.since, "until": args.until, "ids": ids}


def table(events: list[WebhookEvent]) -> str:
    rows = [("WEBHOOK_ID", "TYPE", "ATTEMPTS", "RECEIVED_AT", "LAST_ERROR")]
    for e in events:
        received = e.received_at.strftime("%Y-%m-%d %H:%M:%SZ")
        rows.append((e.webhook_id, e.type or "-", str(e.attempts), received, short(e.last_error)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True))
        + "  "
        + row[4]
        for row in rows
    )


def describe(event: WebhookEvent) -> str:
    lines = [
        f"webhook_id:   {event.webhook_id}",
        f"type:         {event.type or '- (no valid envelope)'}",
        f"status:       {event.status}"
        + ("" if event.status == EventStatus.DEAD else "  (not a dead letter now)"),
        f"attempts:     {event.attempts}",
        f"received_at:  {isoformat(event.received_at)}",
        f"event_at:     {isoformat(event.event_at) or '-'}",
        f"processed_at: {isoformat(event.processed_at) or '-'}",
        f"last_error:   {event.last_error or '-'}",
        "headers:",
        *(f"  {name}: {value}" for name, value in sorted((event.headers or {}).items())),
        "body:",
    ]
    if event.body is None:
        lines.append(f"  - (purged at {isoformat(event.purged_at)}: RETENTION_DAYS)")
        return "\n".join(lines)
    if event.erased_at is not None:
        lines[-1] = f"body (personal data erased at {isoformat(event.erased_at)}):"
    text = event.body.decode("utf-8", errors="replace")
    with suppress(ValueError):
        text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    lines.extend(f"  {line}" for line in text.splitlines())
    return "\n".join(lines)
