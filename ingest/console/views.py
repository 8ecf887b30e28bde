"""The console's pages: overview, events, dead letters, records, customers, search, changes."""

from __future__ import annotations

import contextlib
from typing import Any

from flask import redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from sqlalchemy import select
from sqlalchemy.orm import Session

from ingest.console import queries
from ingest.console.blueprint import bp
from ingest.records import RECORDS
from ingest.state import state
from shared import changes, deadletters
from shared.deadletters import FilterError
from shared.models import Change, DeliveryStatus, EventStatus, ReconcileRun
from shared.queue import enqueue_deliveries

Page = ResponseReturnValue


def _message(title: str, message: str, code: int) -> tuple[str, int]:
    return render_template("console/message.html", title=title, message=message), code


@bp.get("/")
def overview() -> Page:
    with Session(state().engine) as session:
        data = queries.overview(session)
        runs = session.scalars(
            select(ReconcileRun).order_by(ReconcileRun.started_at.desc()).limit(5)
        ).all()
    return render_template(
        "console/overview.html",
        data=data,
        changes=change_feed(),
        statuses=list(EventStatus),
        reconcile_runs=runs,
    )


@bp.get("/events")
def events() -> Page:
    args = request.args
    try:
        selection = queries.EventFilter.parse(
            status=args.get("status"),
            type_glob=args.get("type"),
            since=args.get("since"),
            until=args.get("until"),
        )
        before = queries.Cursor.decode(args.get("before"))
        with Session(state().engine) as session:
            page = queries.list_events(session, selection, before)
    except FilterError as exc:
        return render_template(
            "console/events.html", error=str(exc), page=None, statuses=list(EventStatus)
        ), 400
    return render_template("console/events.html", page=page, error=None, statuses=list(EventStatus))


@bp.get("/events/<webhook_id>")
def event(webhook_id: str) -> Page:
    with Session(state().engine) as session:
        page = queries.event_page(session, webhook_id)
        if page is None:
            return _message("Not found", f"No event {webhook_id!r}.", 404)
        return render_template("console/event.html", page=page, ev=page.event)


@bp.get("/dead-letters")
def dead_letters() -> Page:
    args = request.args
    filters = {key: args.get(key, "") for key in ("type", "since", "until")}
    try:
        before = queries.Cursor.decode(args.get("before"))
        with Session(state().engine) as session:
            page, total = queries.list_dead_letters(
                session,
                type_glob=filters["type"],
                since=filters["since"],
                until=filters["until"],
                before=before,
            )
    except FilterError as exc:
        return render_template(
            "console/dead_letters.html", error=str(exc), page=None, total=0, filters=filters
        ), 400
    return render_template(
        "console/dead_letters.html", page=page, total=total, error=None, filters=filters
    )


@bp.post("/dead-letters/retry")
def retry_dead_letters() -> Page:
    """Retry in two steps: the dry-run count first, then (confirmed) the retry and its result.

    The selection and both steps go through shared/deadletters.py as the admin API's
    POST /api/dead-letters/retry does.
    """
    form = request.form
    scope = form.get("scope", "selected")
    ids = form.getlist("ids") if scope == "selected" else []
    filters = {key: form.get(key, "") for key in ("type", "since", "until")}
    selection: dict[str, Any] = (
        {"ids": ids or None}
        if scope == "selected"
        else {
            "type_glob": filters["type"] or None,
            "since": filters["since"] or None,
            "until": filters["until"] or None,
        }
    )
    if scope == "selected" and not ids:
        return _message("Nothing selected", "Tick one or more dead letters, then Retry.", 400)
    everything = scope == "matching" and not any(filters.values())
    confirmed = form.get("confirm") == "1"
    ingest = state()
    try:
        with Session(ingest.engine) as session, session.begin():
            result = deadletters.requeue_dead(
                session, **selection, everything=everything, dry_run=not confirmed
            )
    except FilterError as exc:
        return _message("Cannot retry", str(exc), 400)
    context = {"scope": scope, "ids": ids, "filters": filters, "everything": everything}
    if not confirmed:
        notes = deadletters.requeue_notes(
            result, None, redrive_after_seconds=ingest.settings.redrive_after_seconds
        )
        return render_template(
            "console/retry_confirm.html", matched=result.matched, notes=notes, **context
        )
    # After the commit: a worker that picks the message up must find the event pending.
    sent = deadletters.enqueue_requeued(ingest.celery, result.requeued, ping=ingest.redis.ping)
    notes = deadletters.requeue_notes(
        result, sent, redrive_after_seconds=ingest.settings.redrive_after_seconds
    )
    return render_template(
        "console/retry_result.html",
        matched=result.matched,
        requeued=result.ids,
        queued=sent.queued,
        notes=notes,
        **context,
    )


@bp.get(f"/<any({', '.join(map(repr, RECORDS))}):family>/<record_id>")
def record(family: str, record_id: str) -> Page:
    _, what = RECORDS[family]
    with Session(state().engine) as session:
        view = queries.record_page(session, family, record_id)
    if view is None:
        return _message("Not found", f"No {what} {record_id!r}.", 404)
    return render_template(
        "console/record.html", family=family, what=what, record_id=record_id, view=view
    )


@bp.get("/customers")
def customers() -> Page:
    after = request.args.get("after") or None
    with Session(state().engine) as session:
        ids, more = queries.customers(session, after)
    return render_template("console/customers.html", ids=ids, more=more)


@bp.get("/customers/<customer_id>")
def customer(customer_id: str) -> Page:
    with Session(state().engine) as session:
        page = queries.customer_page(session, customer_id)
    if page is None:
        return _message("Not found", f"No customer {customer_id!r} in the read model.", 404)
    return render_template("console/customer.html", page=page)


@bp.get("/search")
def search() -> Page:
    query = request.args.get("q", "").strip()
    if not query:
        return redirect(url_for("console.overview"))
    with Session(state().engine) as session:
        found = queries.search(session, query)
    if len(found) == 1:
        return redirect(url_for(found[0].endpoint, **found[0].kwargs))
    return render_template("console/search.html", query=query, found=found), (200 if found else 404)


def change_feed(limit: int = 25) -> dict[str, Any]:
    """The change feed for the Changes page and the overview (shared/changes.py): the newest
    changes, each URL's deliveries in figures, and the deliveries that failed."""
    with Session(state().engine) as session:
        newest = session.scalars(select(Change).order_by(Change.seq.desc()).limit(limit)).all()
        failing = changes.list_deliveries(session, limit=limit, status=DeliveryStatus.DEAD)
        return {
            "urls": list(state().settings.outbound_webhook_url),
            "changes": [changes.change_view(change) for change in newest],
            "summary": changes.outbound_summary(session),
            "dead": [changes.delivery_view(delivery) for delivery in failing],
            "dead_count": changes.requeue_deliveries(
                session, dry_run=True, status=DeliveryStatus.DEAD
            ).matched,
        }


@bp.get("/changes", endpoint="changes")
def changes_page() -> Page:
    return render_template("console/changes.html", feed=change_feed())


@bp.post("/changes/retry")
def retry_deliveries() -> Page:
    """Dead deliveries back to pending (the count was on the page), as the admin API's
    POST /api/changes/deliveries/retry {"status": "dead"} does."""
    ingest = state()
    with Session(ingest.engine) as session, session.begin():
        result = changes.requeue_deliveries(session, status=DeliveryStatus.DEAD)
    if result.requeued:
        # If Redis is away they are pending in the database all the same: beat re-drives them.
        with contextlib.suppress(Exception):
            enqueue_deliveries(ingest.celery, result.requeued, retry=False)
    return _message(
        "Deliveries retried",
        f"{result.matched} matched, {len(result.requeued)} requeued.",
        200,
    )
