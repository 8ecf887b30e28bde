"""`dodo-webhooks changes list|show|retry`: the change feed's outbound deliveries, and the feed."""

from __future__ import annotations

import argparse
from typing import Any

from sqlalchemy import select

from cli.common import add_common, open_session, print_json, settings_for, short
from cli.errors import CommandError
from shared import changes
from shared.changes import FeedError
from shared.models import DeliveryStatus, OutboundDelivery
from shared.settings import Settings


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "changes",
        help="the change feed and its outbound deliveries: list, show, retry",
        description="Outbound deliveries of the change feed, read from DATABASE_URL; a retry "
        "queues them on REDIS_URL.",
    )
    actions = parser.add_subparsers(dest="changes_command", required=True, metavar="ACTION")

    listing = actions.add_parser(
        "list", help="deliveries, newest first (--feed: the changes themselves, oldest first)"
    )
    listing.add_argument("--status", choices=[str(s) for s in DeliveryStatus])
    listing.add_argument("--url", help="deliveries to this URL only")
    listing.add_argument("--since", metavar="WHEN", help="created since: ISO time or date, 2h, 7d")
    listing.add_argument("--change-id", action="append", dest="change_ids", metavar="CHG_ID")
    listing.add_argument("--feed", action="store_true", help="list the changes, not deliveries")
    listing.add_argument("--after", type=int, default=0, help="with --feed: changes after seq")
    listing.add_argument("--kind", choices=changes.KINDS, help="with --feed: one kind")
    listing.add_argument("--entity-id", help="with --feed: one record")
    listing.add_argument("--limit", default=str(changes.DEFAULT_LIMIT))
    add_common(listing)
    listing.set_defaults(run=cmd_list)

    show = actions.add_parser(
        "show", help="a delivery with every attempt (by id), or a change (by chg_ id)"
    )
    show.add_argument("ids", nargs="+", metavar="ID")
    add_common(show)
    show.set_defaults(run=cmd_show)

    retry = actions.add_parser(
        "retry",
        help="send deliveries again: dead ones by filter, any by id (same webhook-id)",
    )
    retry.add_argument("ids", nargs="*", type=int, metavar="DELIVERY_ID")
    retry.add_argument("--change-id", action="append", dest="change_ids", metavar="CHG_ID")
    retry.add_argument("--status", choices=[str(s) for s in DeliveryStatus])
    retry.add_argument("--since", metavar="WHEN")
    retry.add_argument("--dry-run", action="store_true", help="count what would be retried")
    add_common(retry)
    retry.set_defaults(run=cmd_retry)


def cmd_list(args: argparse.Namespace) -> int:
    settings = settings_for(args)
    try:
        limit = changes.parse_int(
            args.limit, "--limit", default=changes.DEFAULT_LIMIT, low=1, high=changes.MAX_LIMIT
        )
        with open_session(settings) as session:
            if args.feed:
                page, next_after = changes.list_changes(
                    session, after=args.after, limit=limit, kind=args.kind, entity_id=args.entity_id
                )
            else:
                rows = changes.list_deliveries(
                    session,
                    limit=limit,
                    status=args.status,
                    url=args.url,
                    since=args.since,
                    change_ids=args.change_ids,
                )
                deliveries = [changes.delivery_view(row) for row in rows]
    except FeedError as exc:
        raise CommandError(str(exc)) from None
    if args.feed:
        if args.json:
            print_json({"changes": page, "next_after": next_after})
        else:
            if page:
                print(feed_table(page))
            print(f"{len(page)} change(s); next page: --after {next_after}")
        return 0
    if args.json:
        print_json({"deliveries": deliveries})
    else:
        if deliveries:
            print(deliveries_table(deliveries))
        print(f"{len(deliveries)} deliveries")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    settings = settings_for(args)
    shown: list[dict[str, Any]] = []
    missing: list[str] = []
    with open_session(settings) as session:
        for identity in args.ids:
            if identity.startswith("chg_"):
                change = changes.get_change(session, identity)
                if change is None:
                    missing.append(identity)
                    continue
                rows = session.scalars(
                    select(OutboundDelivery).where(OutboundDelivery.change_id == identity)
                ).all()
                view = changes.change_view(change)
                shown.append({**view, "deliveries": [changes.delivery_view(r) for r in rows]})
            elif identity.isdigit():
                delivery = session.get(OutboundDelivery, int(identity))
                if delivery is None:
                    missing.append(identity)
                    continue
                shown.append(changes.delivery_detail(session, delivery))
            else:
                missing.append(identity)
    if args.json:
        print_json(shown)
    else:
        for position, item in enumerate(shown):
            if position:
                print()
            print(describe(item))
    if missing:
        raise CommandError(f"no delivery or change {', '.join(missing)}")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    settings = settings_for(args)
    try:
        with open_session(settings) as session, session.begin():
            result = changes.requeue_deliveries(
                session,
                dry_run=args.dry_run,
                ids=args.ids or None,
                change_ids=args.change_ids,
                status=args.status,
                since=args.since,
            )
    except FeedError as exc:
        raise CommandError(str(exc)) from None
    queued = _enqueue(settings, result.requeued) if result.requeued else 0
    if args.json:
        print_json(
            {
                "matched": result.matched,
                "requeued": len(result.requeued),
                "queued": queued,
                "dry_run": args.dry_run,
            }
        )
    elif args.dry_run:
        print(f"dry run: {result.matched} deliveries would be sent again; nothing changed")
    else:
        print(
            f"{result.matched} deliveries matched, {len(result.requeued)} set pending, "
            f"{queued} queued"
            + ("" if queued == len(result.requeued) else " (beat re-drives the rest)")
        )
    return 0


def _enqueue(settings: Settings, ids: list[int]) -> int:
    """Queue on REDIS_URL; when Redis is away the deliveries are pending anyway (beat)."""
    from shared.queue import enqueue_deliveries, make_celery

    celery = make_celery(settings)
    celery.conf.broker_connection_timeout = 2
    try:
        enqueue_deliveries(celery, ids, retry=False)
        return len(ids)
    except Exception:
        return 0
    finally:
        celery.close()


def deliveries_table(deliveries: list[dict[str, Any]]) -> str:
    rows: list[tuple[str, ...]] = [
        ("ID", "CHANGE_ID", "STATUS", "ATTEMPTS", "CODE", "URL", "LAST_ERROR")
    ]
    for d in deliveries:
        rows.append(
            (
                str(d["id"]),
                d["change_id"],
                d["status"],
                str(d["attempts"]),
                str(d["last_status_code"] or "-"),
                d["url"],
                short(d["last_error"]),
            )
        )
    return _columns(rows)


def feed_table(page: list[dict[str, Any]]) -> str:
    rows: list[tuple[str, ...]] = [("SEQ", "ID", "KIND", "ENTITY_ID", "CAUSE", "CHANGED")]
    for c in page:
        rows.append(
            (
                str(c["seq"]),
                c["id"],
                c["kind"],
                c["entity_id"],
                c["cause"]["type"],
                short(", ".join(c["changed"])),
            )
        )
    return _columns(rows)


def _columns(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True))
        + "  "
        + row[-1]
        for row in rows
    )


def describe(item: dict[str, Any]) -> str:
    if "attempts_made" in item:
        lines = [f"{name + ':':18}{item[name]}" for name in item if name != "attempts_made"]
        lines.append("attempts:")
        for attempt in item["attempts_made"]:
            code = attempt["status_code"] or "-"
            lines.append(
                f"  #{attempt['attempt']} {attempt['started_at']}  {code}  "
                f"{attempt['duration_ms']} ms  {short(attempt['error'])}"
            )
        return "\n".join(lines)
    lines = [
        f"{name + ':':14}{item[name]}"
        for name in ("id", "seq", "kind", "entity_id", "customer_id", "created_at")
    ]
    lines.append(f"{'cause:':14}{item['cause']['type']} {item['cause']['webhook_id']}")
    lines.append(f"{'changed:':14}{', '.join(item['changed'])}")
    for delivery in item["deliveries"]:
        lines.append(
            f"  delivery {delivery['id']}: {delivery['status']} after {delivery['attempts']} "
            f"attempt(s) to {delivery['url']}"
        )
    return "\n".join(lines)
