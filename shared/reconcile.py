"""Reconciliation and backfill: Dodo's objects as its API holds them, compared with the read
model; each missing or differing object recorded in the inbox as a synthetic event.

Shared by `dodo-webhooks reconcile` (cli/reconcile.py) and beat's periodic run
(workers/tasks.py). A synthetic event goes through the same claim, ordering and idempotency
as a delivery: it carries the object's state as of the fetch, stamped with the time the
request was sent, so it never overwrites state from an event that occurred later, and a
later webhook supersedes it.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, Final, cast

from sqlalchemy import Boolean, Engine, Integer, Table, func, inspect, select
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.types import BigInteger

from shared.bodies import ensure_ahead, partitioned, store
from shared.catalog import KIND_OF, KINDS, queue_for
from shared.db import UTCDateTime, insert_once, transaction, utcnow
from shared.envelope import Subjects, event_subjects
from shared.models import (
    CreditBalance,
    CreditEntry,
    Dispute,
    EventStatus,
    ExactDecimal,
    LicenseKey,
    Payment,
    ReconcileRun,
    Refund,
    SnapshotMixin,
    Subscription,
    WebhookEvent,
    jsonable,
)
from shared.settings import ConfigError, Settings, first_line, redact_url

if TYPE_CHECKING:
    import dodopayments
    import httpx

FAMILIES: Final = ("payments", "refunds", "disputes", "subscriptions", "license_keys", "credits")
# Dodo's maximum page size.
PAGE_SIZE: Final = 100
# Pages asked of one created_at window before it is split in halves: Dodo caps page_number
# (deep OFFSET pagination), so a window holding more is listed as two smaller ones.
MAX_PAGES: Final = 20
# Where a run without --since starts: before Dodo Payments existed.
EPOCH: Final = datetime(2020, 1, 1, tzinfo=UTC)
# A window narrower than this is not split again (its overflow is reported, not lost quietly).
MIN_WINDOW: Final = timedelta(seconds=1)
SOURCE_HEADER: Final = "dodo-webhooks-source"
# After the SDK's own retries of a 429, this many more waits before a run gives up.
RATE_LIMIT_WAITS: Final = 5
RATE_LIMIT_WAIT_CAP: Final = 120.0
# PostgreSQL advisory lock held by the run that writes: one at a time, beat's or a command's.
RUN_LOCK_KEY: Final = 0x646F646F5243  # "dodoRC"
# The SDK retries 408, 409, 429, 5xx and lost connections itself, with backoff (a
# Retry-After of up to 60 s obeyed); this many times a request.
SDK_MAX_RETRIES = 4


class ReconcileError(Exception):
    """A condition that stops the run, in one line (the key, the API, the database)."""


class AlreadyRunning(ReconcileError):
    """Another reconciliation (beat's or a command's) holds the run lock."""


class NotFound(ReconcileError):
    """Dodo's API answered 404."""


class MalformedObject(ValueError):
    """An object from the API that cannot be a record: skipped, counted and reported."""


@dataclass(frozen=True)
class SnapshotFamily:
    """A family whose record holds one object's latest state (payments ... license keys)."""

    name: str
    kind: str
    model: type[SnapshotMixin]
    key: str
    status_field: str
    # The list item lacks fields the object's full form carries (the customer): an object
    # that is recorded is retrieved first.
    retrieve: bool = False

    def event_type(self, obj: dict[str, Any], *, missing: bool) -> str:
        """A type naming the object's status; the kind's `reconciled` type if none does."""
        status = obj.get(self.status_field)
        prefix = self.kind
        if isinstance(status, str):
            name = status.removeprefix("dispute_") if self.kind == "dispute" else status
            candidate = f"{prefix}.{name}"
            if KIND_OF.get(candidate) == self.kind:
                return candidate
        if self.kind == "license_key" and missing:
            return "license_key.created"
        reconciled = KINDS[self.kind].reconciled
        assert reconciled is not None
        return reconciled


SNAPSHOTS: Final[dict[str, SnapshotFamily]] = {
    "payments": SnapshotFamily("payments", "payment", Payment, "payment_id", "status"),
    "refunds": SnapshotFamily("refunds", "refund", Refund, "refund_id", "status", retrieve=True),
    "disputes": SnapshotFamily(
        "disputes", "dispute", Dispute, "dispute_id", "dispute_status", retrieve=True
    ),
    "subscriptions": SnapshotFamily(
        "subscriptions", "subscription", Subscription, "subscription_id", "status"
    ),
    "license_keys": SnapshotFamily("license_keys", "license_key", LicenseKey, "id", "status"),
}

# A ledger entry's transaction_type -> the credit event type that carries it.
CREDIT_TYPES: Final = {
    "credit_added": "credit.added",
    "credit_deducted": "credit.deducted",
    "credit_expired": "credit.expired",
    "credit_rolled_over": "credit.rolled_over",
    "rollover_forfeited": "credit.rollover_forfeited",
    "overage_charged": "credit.overage_charged",
    "overage_reset": "credit.overage_reset",
    "manual_adjustment": "credit.manual_adjustment",
}
LEDGER_FIELDS: Final = (
    "id",
    "customer_id",
    "credit_entitlement_id",
    "transaction_type",
    "is_credit",
    "amount",
    "balance_before",
    "balance_after",
    "overage_before",
    "overage_after",
    "created_at",
)


def parse_families(value: str | None) -> tuple[str, ...]:
    if not value:
        return FAMILIES
    names = tuple(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names:
        raise ReconcileError(
            f"--family: unknown {', '.join(unknown) or '(none)'}; choose from {','.join(FAMILIES)}"
        )
    return names


def parse_since(value: str | None) -> datetime | None:
    """`--since`: an ISO date or datetime, UTC when it names no zone."""
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ReconcileError(
            f"--since: {value!r} is not an ISO date or datetime (2026-01-31, 2026-01-31T12:00Z)"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


# ---------------------------------------------------------------------------------------------
# The results


@dataclass
class Difference:
    family: str
    id: str
    change: str  # "missing" or "differs"
    fields: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    webhook_id: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "id": self.id,
            "change": self.change,
            "fields": {k: {"local": a, "api": b} for k, (a, b) in self.fields.items()},
            "webhook_id": self.webhook_id,
        }


@dataclass
class FamilyCounts:
    listed: int = 0
    missing: int = 0
    differs: int = 0
    recorded: int = 0
    malformed: int = 0

    def as_json(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass
class Report:
    families: tuple[str, ...]
    dry_run: bool
    started_at: datetime
    counts: dict[str, FamilyCounts] = field(default_factory=dict)
    differences: list[Difference] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    api_calls: int = 0
    queued: int = 0
    finished_at: datetime | None = None

    def total(self, name: str) -> int:
        return sum(getattr(c, name) for c in self.counts.values())

    def as_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "api_calls": self.api_calls,
            "families": {name: self.counts[name].as_json() for name in self.families},
            "totals": {
                name: self.total(name)
                for name in ("listed", "missing", "differs", "recorded", "malformed")
            },
            "queued": self.queued,
            "differences": [d.as_json() for d in self.differences],
            "problems": self.problems,
        }


class Progress:
    """What a run tells its watcher; the command draws bars, beat tells nobody."""

    def start(self, family: str, total: float | None) -> None:
        return None

    def advance(self, family: str, amount: float, *, listed: int) -> None:
        return None

    def finish(self, family: str) -> None:
        return None


# ---------------------------------------------------------------------------------------------
# Dodo's API, through the official SDK


class RateLimiter:
    """At most `rate` requests a second, retries included (an httpx request hook)."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._next = 0.0
        self._lock = threading.Lock()
        self.calls = 0

    def __call__(self, _request: httpx.Request) -> None:
        with self._lock:
            now = time.monotonic()
            wait = self._next - now
            self._next = max(now, self._next) + self._interval
            self.calls += 1
        if wait > 0:
            time.sleep(wait)


class DodoApi:
    """The list and retrieve calls reconciliation makes, as plain JSON objects.

    Pages are asked for explicitly (the SDK's automatic paging numbers from 1 after a first
    page 0, so it would skip Dodo's page 1) and raw (an object that does not fit the SDK's
    model is counted as malformed here rather than half-built there).
    """

    def __init__(self, settings: Settings, *, sleep: Callable[[float], None] = time.sleep) -> None:
        import dodopayments

        key = settings.dodo_payments_api_key
        if not key:
            raise ConfigError(
                "DODO_PAYMENTS_API_KEY is not set: give the API key of the Dodo business "
                "(dashboard → Developer → API keys); reconcile only reads"
            )
        self.base_url = settings.dodo_payments_base_url or dodopayments.ENVIRONMENTS.get(
            settings.dodo_payments_environment, ""
        )
        self.limiter = RateLimiter(settings.reconcile_requests_per_second)
        self._sleep = sleep
        self._client = dodopayments.DodoPayments(
            bearer_token=key,
            base_url=self.base_url,
            max_retries=SDK_MAX_RETRIES,
            timeout=30.0,
            http_client=dodopayments.DefaultHttpxClient(event_hooks={"request": [self.limiter]}),
        )

    @property
    def calls(self) -> int:
        return self.limiter.calls

    def close(self) -> None:
        self._client.close()

    def list_objects(self, family: str, **params: Any) -> list[Any]:
        resource = self._resource(family)
        return self._items(f"GET /{family}", lambda: resource.with_raw_response.list(**params))

    def retrieve(self, family: str, object_id: str) -> Any:
        """The object's full form, or None when Dodo no longer finds it (the list's stands)."""
        resource = self._resource(family)
        try:
            return self._call(
                f"GET /{family}/{object_id}",
                lambda: resource.with_raw_response.retrieve(object_id),
            )
        except NotFound:
            return None

    def entitlements(self, page_number: int) -> list[Any]:
        entitlements = self._client.credit_entitlements
        return self._items(
            "GET /credit-entitlements",
            lambda: entitlements.with_raw_response.list(
                page_number=page_number, page_size=PAGE_SIZE
            ),
        )

    def balances(self, entitlement_id: str, page_number: int, customer_id: str | None) -> list[Any]:
        balances = self._client.credit_entitlements.balances
        extra: dict[str, Any] = {"customer_id": customer_id} if customer_id else {}
        return self._items(
            f"GET /credit-entitlements/{entitlement_id}/balances",
            lambda: balances.with_raw_response.list(
                entitlement_id, page_number=page_number, page_size=PAGE_SIZE, **extra
            ),
        )

    def ledger(
        self, entitlement_id: str, customer_id: str, page_number: int, since: datetime | None
    ) -> list[Any]:
        balances = self._client.credit_entitlements.balances
        extra: dict[str, Any] = {"start_date": since} if since else {}
        return self._items(
            f"GET /credit-entitlements/{entitlement_id}/balances/{customer_id}/ledger",
            lambda: balances.with_raw_response.list_ledger(
                customer_id,
                credit_entitlement_id=entitlement_id,
                page_number=page_number,
                page_size=PAGE_SIZE,
                **extra,
            ),
        )

    def _resource(self, family: str) -> Any:
        return getattr(self._client, family)

    def _items(self, what: str, request: Callable[[], Any]) -> list[Any]:
        body = self._call(what, request)
        items = body.get("items") if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise ReconcileError(f"Dodo's API answered {what} without an `items` list")
        return items

    def _call(self, what: str, request: Callable[[], Any]) -> Any:
        """One request; its errors as one line. A 429 the SDK gave up on is waited out."""
        import dodopayments

        for wait in range(RATE_LIMIT_WAITS + 1):
            try:
                with warnings.catch_warnings():
                    # The SDK marks license_keys.list/retrieve deprecated, with no other
                    # way to list license keys: the warning is not news at every page.
                    warnings.simplefilter("ignore", DeprecationWarning)
                    return request().json()
            except dodopayments.RateLimitError as exc:
                if wait == RATE_LIMIT_WAITS:
                    raise ReconcileError(
                        f"Dodo's API kept answering 429 Too Many Requests to {what}; lower "
                        "RECONCILE_REQUESTS_PER_SECOND or run again later"
                    ) from None
                self._sleep(_retry_after(exc.response))
            except (dodopayments.AuthenticationError, dodopayments.PermissionDeniedError) as exc:
                raise ReconcileError(
                    f"DODO_PAYMENTS_API_KEY: Dodo's API at {redact_url(self.base_url)} answered "
                    f"{exc.status_code} to {what}: the key is wrong, revoked or lacks the "
                    "Viewer role (a test_mode key needs DODO_PAYMENTS_ENVIRONMENT=test_mode)"
                ) from None
            except dodopayments.NotFoundError as exc:
                raise NotFound(f"Dodo's API answered 404 to {what}: {_said(exc)}") from None
            except dodopayments.APIStatusError as exc:
                raise ReconcileError(
                    f"Dodo's API answered {exc.status_code} to {what}: {_said(exc)}"
                ) from None
            except dodopayments.APIConnectionError as exc:
                cause = exc.__cause__ or exc
                raise ReconcileError(
                    f"cannot reach Dodo's API at {redact_url(self.base_url)}: {first_line(cause)}"
                ) from None
            except ValueError as exc:
                raise ReconcileError(
                    f"Dodo's API answered {what} with invalid JSON: {exc}"
                ) from None
        raise AssertionError("unreachable")


def _retry_after(response: httpx.Response) -> float:
    try:
        seconds = float(response.headers.get("retry-after", "1"))
    except ValueError:
        seconds = 1.0
    return min(max(seconds, 0.5), RATE_LIMIT_WAIT_CAP)


def _said(exc: dodopayments.APIStatusError) -> str:
    """Dodo's own message (`{"message": ...}`) in one short line, else the SDK's."""
    body = exc.body
    message = body.get("message") if isinstance(body, dict) else None
    text = str(message if isinstance(message, str) and message else exc.message or "")
    lines = text.strip().splitlines()
    return lines[0][:200] if lines else "(no message)"


# ---------------------------------------------------------------------------------------------
# Comparing an object with its record


_MISSING: Final = object()


def _carried(obj: dict[str, Any], name: str) -> Any:
    """The object's value for the record's column `name`, or _MISSING when it has none."""
    if name in obj:
        return obj[name]
    if name == "customer_id" and isinstance(obj.get("customer"), dict):
        return obj["customer"].get("customer_id", _MISSING)
    return _MISSING


def _coerce(table: Table, name: str, value: Any) -> Any:
    """The API's JSON value as the column holds it, or MalformedObject."""
    if value is None:
        return None
    column_type = table.c[name].type
    try:
        if isinstance(column_type, UTCDateTime):
            if not isinstance(value, str):
                raise TypeError
            when = datetime.fromisoformat(value)
            if when.tzinfo is None:
                raise ValueError
            return when.astimezone(UTC)
        if isinstance(column_type, ExactDecimal):
            if isinstance(value, bool | float):
                raise TypeError
            return Decimal(str(value))
        if isinstance(column_type, Boolean):
            if not isinstance(value, bool):
                raise TypeError
            return value
        if isinstance(column_type, Integer | BigInteger):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError
            return value
        if not isinstance(value, str) or not value:
            raise TypeError
        return value
    except (TypeError, ValueError, InvalidOperation):
        raise MalformedObject(f"{name} is not a valid {column_type}") from None


def object_state(family: SnapshotFamily, obj: Any) -> tuple[str, dict[str, Any]]:
    """The object's id and its record columns as the record holds them; MalformedObject if
    it cannot be a record."""
    if not isinstance(obj, dict):
        raise MalformedObject("not a JSON object")
    object_id = obj.get(family.key)
    if not isinstance(object_id, str) or not object_id or len(object_id) > 255:
        raise MalformedObject(f"no usable {family.key}")
    table = cast(Table, inspect(family.model).local_table)
    state: dict[str, Any] = {}
    for name in family.model.record_columns():
        value = _carried(obj, name)
        if value is _MISSING:
            if not table.c[name].nullable and table.c[name].default is None:
                raise MalformedObject(f"{object_id}: {name} missing")
            continue
        try:
            state[name] = _coerce(table, name, value)
        except MalformedObject as exc:
            raise MalformedObject(f"{object_id}: {exc}") from None
        if state[name] is None and not table.c[name].nullable:
            raise MalformedObject(f"{object_id}: {name} is null")
    return object_id, state


def differing_fields(record: SnapshotMixin, state: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The columns both carry whose values differ: {name: (local, api)}."""
    return {
        name: (jsonable(getattr(record, name)), jsonable(value))
        for name, value in state.items()
        if getattr(record, name) != value
    }


# ---------------------------------------------------------------------------------------------
# Synthetic events


@dataclass(frozen=True)
class SyntheticEvent:
    webhook_id: str
    type: str
    body: bytes
    event_at: datetime
    # Whose it is, as the ingest records a delivery's (the erasure finds it by these).
    subjects: Subjects


def synthetic_event(
    kind: str,
    object_id: str,
    event_type: str,
    obj: dict[str, Any],
    at: datetime,
    *,
    state: dict[str, Any],
    basis: str,
) -> SyntheticEvent:
    """The event carrying `obj` as of `at`.

    Its id is derived from `state` (what the record would hold: the fields compared, not a
    field that may change at every request) and what the read model held (`basis`, the
    event its record holds), so a second run with nothing changed records nothing, and a
    state seen again after another one is recorded again.
    """
    at = at.astimezone(UTC)
    canonical = json.dumps(
        {name: jsonable(value) for name, value in state.items()},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    digest = hashlib.sha256(f"{canonical}\n{basis}".encode()).hexdigest()[:16]
    webhook_id = f"reconcile_{kind}_{object_id}_{digest}"
    if len(webhook_id) > 255 or not webhook_id.isascii() or not webhook_id.isprintable():
        webhook_id = f"reconcile_{kind}_{hashlib.sha256(object_id.encode()).hexdigest()}_{digest}"
    envelope = {
        "business_id": obj.get("business_id") or "reconcile",
        "type": event_type,
        "timestamp": at.isoformat(),
        "data": obj,
    }
    body = json.dumps(envelope, separators=(",", ":"), default=str).encode()
    return SyntheticEvent(webhook_id, event_type, body, at, event_subjects(event_type, obj))


def _event_row(event: SyntheticEvent, now: datetime) -> dict[str, Any]:
    return {
        "webhook_id": event.webhook_id,
        "type": event.type,
        "status": EventStatus.PENDING,
        "attempts": 0,
        "last_error": None,
        "body": event.body,
        "headers": {
            "webhook-id": event.webhook_id,
            "webhook-timestamp": str(int(event.event_at.timestamp())),
            SOURCE_HEADER: "reconcile",
            "content-type": "application/json",
        },
        "webhook_ts": int(event.event_at.timestamp()),
        "event_at": event.event_at,
        "received_at": now,
        "enqueued_at": now,
        "customer_id": event.subjects.customer_id,
        "payment_id": event.subjects.payment_id,
    }


def record_events(session: Session, events: Sequence[SyntheticEvent]) -> list[SyntheticEvent]:
    """Insert each into the inbox once (ON CONFLICT DO NOTHING); those newly recorded."""
    table = cast(Table, WebhookEvent.__table__)
    dialect = session.get_bind().dialect.name
    insert = insert_once(dialect, table, ("webhook_id",), ("webhook_id",))
    now = utcnow()
    in_days = partitioned(session)
    if in_days and events:
        ensure_ahead(cast(Engine, session.get_bind()), now)
    recorded = []
    for event in events:
        row = _event_row(event, now)
        # As the ingest stores bodies: in their day's partition (shared/bodies.py).
        held = (row.pop("body"), row.pop("headers")) if in_days else None
        if session.execute(insert, row).first() is not None:
            recorded.append(event)
            if held is not None:
                store(session, event.webhook_id, now, *held)
    return recorded


# ---------------------------------------------------------------------------------------------
# The run


# Wakes the drain of a queue (shared/queue.py `send_drain`): a page of recorded events is a
# backlog, applied in batches as the ingest's deliveries are, not one task per event.
Wake = Callable[[str], None]


@dataclass
class Reconciler:
    """One run: list each family from the API, compare, record, queue."""

    api: DodoApi
    sessions: sessionmaker[Session]
    wake: Wake | None
    dry_run: bool = False
    since: datetime | None = None
    customer_id: str | None = None
    progress: Progress = field(default_factory=Progress)
    now: Callable[[], datetime] = utcnow

    def run(self, families: Sequence[str], report: Report) -> Report:
        for name in families:
            counts = report.counts.setdefault(name, FamilyCounts())
            if name == "credits":
                self._credits(counts, report)
            else:
                self._snapshots(SNAPSHOTS[name], counts, report)
            self.progress.finish(name)
        return report

    # -- snapshot families -------------------------------------------------------------

    def _snapshots(self, family: SnapshotFamily, counts: FamilyCounts, report: Report) -> None:
        until = self.now()
        start = self.since or EPOCH
        self.progress.start(family.name, (until - start).total_seconds())
        seen: set[str] = set()
        for items, fetched_at, covered in self._windows(family, start, until, report):
            self._compare_page(family, items, fetched_at, seen, counts, report)
            self.progress.advance(family.name, covered, listed=counts.listed)

    def _windows(
        self, family: SnapshotFamily, start: datetime, until: datetime, report: Report
    ) -> Iterator[tuple[list[Any], datetime, float]]:
        """Pages of created_at windows, each with the seconds of the range it finished.

        Dodo caps page_number, so a window still full after MAX_PAGES pages is listed on in
        smaller ones: when its pages came newest first (as Dodo lists), only what is older
        than the oldest object seen is left, [gte, oldest] (inclusive: ties are asked for
        again); otherwise the window is listed again as two halves. Objects met twice are
        deduplicated by id.
        """
        stack = [(start, until)]
        while stack:
            gte, lte = stack.pop()
            span = (lte - gte).total_seconds()
            newest_first = True
            oldest: datetime | None = None
            fetched_at = self.now()
            for page in range(MAX_PAGES):
                params: dict[str, Any] = {
                    "created_at_gte": gte,
                    "created_at_lte": lte,
                    "page_number": page,
                    "page_size": PAGE_SIZE,
                }
                if self.customer_id:
                    params["customer_id"] = self.customer_id
                fetched_at = self.now()
                items = self.api.list_objects(family.name, **params)
                for created in _created_ats(items):
                    if oldest is not None and created > oldest:
                        newest_first = False
                    oldest = created if oldest is None else min(oldest, created)
                full = len(items) >= PAGE_SIZE
                yield items, fetched_at, (0.0 if full else span)
                if not full:
                    break
            else:
                if newest_first and oldest is not None and gte < oldest < lte:
                    stack.append((gte, oldest))
                    yield [], fetched_at, (lte - oldest).total_seconds()
                elif lte - gte > MIN_WINDOW:
                    middle = gte + (lte - gte) / 2
                    stack.extend([(middle, lte), (gte, middle)])
                else:
                    report.problems.append(
                        f"{family.name}: more than {MAX_PAGES * PAGE_SIZE} objects created "
                        f"between {gte.isoformat()} and {lte.isoformat()}: the rest not listed"
                    )
                    yield [], fetched_at, span

    def _compare_page(
        self,
        family: SnapshotFamily,
        items: list[Any],
        fetched_at: datetime,
        seen: set[str],
        counts: FamilyCounts,
        report: Report,
    ) -> None:
        states: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        for obj in items:
            try:
                object_id, state = object_state(family, obj)
            except MalformedObject as exc:
                counts.malformed += 1
                report.problems.append(f"{family.name}: malformed object skipped: {exc}")
                continue
            if object_id in seen:
                continue
            seen.add(object_id)
            counts.listed += 1
            states[object_id] = (obj, state)
        if not states:
            return
        key_column = getattr(family.model, family.key)
        with self.sessions() as session:
            held = {
                getattr(record, family.key): record
                for record in session.scalars(
                    select(family.model).where(key_column.in_(list(states)))
                )
            }
        pending: list[tuple[Difference, SyntheticEvent]] = []
        for object_id, (obj, state) in states.items():
            record = held.get(object_id)
            if record is None:
                difference = Difference(family.name, object_id, "missing")
                counts.missing += 1
            else:
                fields = differing_fields(record, state)
                if not fields:
                    continue
                difference = Difference(family.name, object_id, "differs", fields)
                counts.differs += 1
            report.differences.append(difference)
            if self.dry_run:
                continue
            at, full = fetched_at, obj
            if family.retrieve:
                at = self.now()
                retrieved = self.api.retrieve(family.name, object_id)
                try:
                    same_id, retrieved_state = object_state(family, retrieved)
                except MalformedObject:
                    same_id = None  # gone (None) or unusable: the list's form stands
                if same_id == object_id:
                    full, state = retrieved, retrieved_state
                else:
                    at = fetched_at
            event_type = family.event_type(full, missing=record is None)
            basis = record.last_webhook_id if record is not None else ""
            event = synthetic_event(
                family.kind, object_id, event_type, full, at, state=state, basis=basis
            )
            difference.webhook_id = event.webhook_id
            pending.append((difference, event))
        self._record(counts, report, [event for _, event in pending])

    def _record(self, counts: FamilyCounts, report: Report, events: list[SyntheticEvent]) -> None:
        if not events or self.dry_run:
            return
        try:
            with transaction(self.sessions) as session:
                recorded = record_events(session, events)
        except Exception as exc:
            raise ReconcileError(
                f"DATABASE_URL: could not record events: {first_line(exc)}"
            ) from None
        counts.recorded += len(recorded)
        for queue, count in sorted(Counter(queue_for(e.type) for e in recorded).items()):
            if self.wake is None:
                return
            try:
                self.wake(queue)
                report.queued += count
            except Exception as exc:
                # Recorded and pending: beat's re-drive queues them. Trying each page of
                # thousands against a Redis that is away would take seconds apiece.
                self.wake = None
                report.problems.append(
                    f"REDIS_URL: could not queue ({first_line(exc)}); the events not queued "
                    "stay pending and beat's re-drive queues them"
                )

    # -- credits -----------------------------------------------------------------------

    def _credits(self, counts: FamilyCounts, report: Report) -> None:
        self.progress.start("credits", None)
        entitlements = _unique_pages(self.api.entitlements, "id")
        for entitlement in entitlements:
            entitlement_id = entitlement.get("id") if isinstance(entitlement, dict) else None
            if not isinstance(entitlement_id, str) or not entitlement_id:
                counts.malformed += 1
                report.problems.append("credits: malformed credit entitlement skipped")
                continue
            accounts = _unique_pages(self._balance_pages(entitlement_id), "customer_id")
            for account in accounts:
                self._account(entitlement_id, account, counts, report)
                self.progress.advance("credits", 1, listed=counts.listed)

    def _balance_pages(self, entitlement_id: str) -> Callable[[int], list[Any]]:
        def fetch(page: int) -> list[Any]:
            return self.api.balances(entitlement_id, page, self.customer_id)

        return fetch

    def _account(
        self, entitlement_id: str, account: Any, counts: FamilyCounts, report: Report
    ) -> None:
        customer_id = account.get("customer_id") if isinstance(account, dict) else None
        if not isinstance(customer_id, str) or not customer_id:
            counts.malformed += 1
            report.problems.append(f"credits: malformed balance of {entitlement_id} skipped")
            return
        counts.listed += 1
        if self._account_complete(entitlement_id, customer_id, account):
            return
        counts.differs += 1
        fetched: dict[str, tuple[dict[str, Any], datetime]] = {}
        page = 0
        while True:
            at = self.now()
            items = self.api.ledger(entitlement_id, customer_id, page, self.since)
            for entry in items:
                problem = _ledger_problem(entry, entitlement_id, customer_id)
                if problem:
                    counts.malformed += 1
                    report.problems.append(f"credits: malformed ledger entry skipped: {problem}")
                    continue
                fetched.setdefault(entry["id"], (entry, at))
            if len(items) < PAGE_SIZE:
                break
            page += 1
        if not fetched:
            return
        with self.sessions() as session:
            held = set(
                session.scalars(select(CreditEntry.id).where(CreditEntry.id.in_(list(fetched))))
            )
        events = []
        for entry_id, (entry, at) in fetched.items():
            if entry_id in held:
                continue
            counts.missing += 1
            event_type = (
                CREDIT_TYPES.get(entry["transaction_type"]) or KINDS["credit_entry"].reconciled
            )
            assert event_type is not None
            # A ledger entry never changes: its id alone names the event.
            event = synthetic_event(
                "credit", entry_id, event_type, entry, at, state={"id": entry_id}, basis=""
            )
            report.differences.append(
                Difference("credits", entry_id, "missing", webhook_id=event.webhook_id)
            )
            events.append(event)
        if not self.dry_run:
            self._record(counts, report, events)

    def _account_complete(self, entitlement_id: str, customer_id: str, account: Any) -> bool:
        """The local ledger needs nothing from the API: same balance and overage, an
        unbroken chain, and its oldest entry starts from nothing (or --since limits the
        look to recent entries)."""
        with self.sessions() as session:
            balance = session.get(CreditBalance, (customer_id, entitlement_id))
            if balance is None or not balance.chain_ok or balance.entry_count == 0:
                return False
            try:
                same = (balance.balance, balance.overage) == (
                    Decimal(str(account.get("balance"))),
                    Decimal(str(account.get("overage"))),
                )
            except InvalidOperation:
                return False
            if not same:
                return False
            if self.since is not None:
                return True
            oldest = session.scalars(
                select(CreditEntry)
                .where(
                    CreditEntry.customer_id == customer_id,
                    CreditEntry.credit_entitlement_id == entitlement_id,
                )
                .order_by(CreditEntry.created_at, CreditEntry.id)
                .limit(1)
            ).first()
        return oldest is not None and oldest.balance_before == 0 and oldest.overage_before == 0


def _created_ats(items: list[Any]) -> Iterator[datetime]:
    for item in items:
        value = item.get("created_at") if isinstance(item, dict) else None
        if isinstance(value, str):
            try:
                when = datetime.fromisoformat(value)
            except ValueError:
                continue
            if when.tzinfo is not None:
                yield when


def _unique_pages(fetch: Callable[[int], list[Any]], key: str) -> list[Any]:
    """Every page from 0 until a short one, each object once (by `key`)."""
    found: dict[Any, Any] = {}
    others: list[Any] = []
    page = 0
    while True:
        items = fetch(page)
        for item in items:
            ident = item.get(key) if isinstance(item, dict) else None
            if isinstance(ident, str):
                found.setdefault(ident, item)
            else:
                others.append(item)
        if len(items) < PAGE_SIZE:
            return [*found.values(), *others]
        page += 1


def _ledger_problem(entry: Any, entitlement_id: str, customer_id: str) -> str | None:
    if not isinstance(entry, dict):
        return "not a JSON object"
    missing = [name for name in LEDGER_FIELDS if entry.get(name) is None]
    if missing:
        return f"{entry.get('id', '?')}: {', '.join(missing)} missing"
    if not isinstance(entry["id"], str) or len(entry["id"]) > 200:
        return "no usable id"
    if (entry["credit_entitlement_id"], entry["customer_id"]) != (entitlement_id, customer_id):
        return f"{entry['id']}: belongs to another account"
    try:
        for name in (
            "amount",
            "balance_before",
            "balance_after",
            "overage_before",
            "overage_after",
        ):
            if isinstance(entry[name], bool | float):
                raise InvalidOperation
            Decimal(str(entry[name]))
        datetime.fromisoformat(str(entry["created_at"]))
    except (InvalidOperation, ValueError):
        return f"{entry['id']}: an amount or created_at does not parse"
    return None


# ---------------------------------------------------------------------------------------------
# The entry points


def reconcile(
    settings: Settings,
    sessions: sessionmaker[Session],
    *,
    wake: Wake | None,
    families: Sequence[str] = FAMILIES,
    since: datetime | None = None,
    customer_id: str | None = None,
    dry_run: bool = False,
    trigger: str = "cli",
    progress: Progress | None = None,
) -> Report:
    """Run once; unless a dry run, the run is written to `reconcile_runs` (with its error,
    when it stops: ReconcileError, re-raised)."""
    report = Report(tuple(families), dry_run, utcnow())
    api = DodoApi(settings)
    reconciler = Reconciler(
        api,
        sessions,
        None if dry_run else wake,
        dry_run=dry_run,
        since=since,
        customer_id=customer_id,
        progress=progress or Progress(),
    )
    error: str | None = None
    try:
        with nullcontext() if dry_run else _run_lock(sessions):
            try:
                reconciler.run(families, report)
            except ReconcileError as exc:
                error = str(exc)
                raise
            finally:
                report.api_calls = api.calls
                report.finished_at = utcnow()
                if not dry_run:
                    _save_run(sessions, report, trigger, error)
    finally:
        api.close()
    return report


@contextmanager
def _run_lock(sessions: sessionmaker[Session]) -> Iterator[None]:
    """Hold the run lock (a session-level advisory lock on PostgreSQL) while writing.

    Two runs at once would only record the same ids twice over, but at twice the API calls.
    """
    engine: Engine = sessions.kw["bind"]
    if engine.dialect.name != "postgresql":
        yield
        return
    try:
        conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        got = conn.scalar(select(func.pg_try_advisory_lock(RUN_LOCK_KEY)))
    except Exception as exc:
        raise ReconcileError(f"DATABASE_URL: cannot take the run lock: {first_line(exc)}") from None
    try:
        if not got:
            raise AlreadyRunning(
                "another reconciliation is running (beat's or a command's): run again later"
            )
        yield
    finally:
        if got:
            with suppress(Exception):
                conn.scalar(select(func.pg_advisory_unlock(RUN_LOCK_KEY)))
        conn.close()


def _save_run(
    sessions: sessionmaker[Session], report: Report, trigger: str, error: str | None
) -> None:
    try:
        with transaction(sessions) as session:
            session.add(
                ReconcileRun(
                    trigger=trigger,
                    started_at=report.started_at,
                    finished_at=report.finished_at,
                    families=",".join(report.families),
                    listed=report.total("listed"),
                    missing=report.total("missing"),
                    differs=report.total("differs"),
                    recorded=report.total("recorded"),
                    malformed=report.total("malformed"),
                    api_calls=report.api_calls,
                    counts={name: c.as_json() for name, c in report.counts.items()},
                    error=error,
                )
            )
    except Exception:
        # The run's own record is bookkeeping: its events are recorded already.
        return
