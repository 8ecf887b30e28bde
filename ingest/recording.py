"""Writing a verified delivery durably, before anything is acknowledged."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, cast

import psycopg
import psycopg.errors
from psycopg import pq
from psycopg.pq.abc import PGresult
from sqlalchemy import Engine, Table
from sqlalchemy.exc import DBAPIError

from ingest.perthread import PerThread
from shared.bodies import ensure_ahead
from shared.db import insert_once, utcnow
from shared.envelope import NO_SUBJECTS, Subjects
from shared.models import EventBody, EventStatus, WebhookEvent

# The row's columns, in the order of the PostgreSQL statement's placeholders.
COLUMNS = (
    "webhook_id",
    "type",
    "status",
    "attempts",
    "last_error",
    "body",
    "headers",
    "webhook_ts",
    "event_at",
    "received_at",
    "enqueued_at",
    "customer_id",
    "payment_id",
)
# On PostgreSQL the body and headers go to their day's partition of `event_bodies`
# (shared/bodies.py), in the same statement: the event row only if its id is new, and its
# body only with it. Prepared once per connection; the body goes as binary bytea, not
# hex-escaped text.
_IN_ROW = tuple(c for c in COLUMNS if c not in ("body", "headers"))
_N = {c: n for n, c in enumerate(COLUMNS, start=1)}
_PG_INSERT = (
    f"WITH event AS (INSERT INTO {WebhookEvent.__tablename__} ({', '.join(_IN_ROW)}) "
    f"VALUES ({', '.join(f'${_N[c]}' for c in _IN_ROW)}) "
    "ON CONFLICT (webhook_id) DO NOTHING RETURNING webhook_id, received_at) "
    f"INSERT INTO {EventBody.__tablename__} (webhook_id, stored_at, body, headers) "
    f"SELECT webhook_id, received_at, ${_N['body']}::bytea, ${_N['headers']}::json FROM event "
    "RETURNING webhook_id"
).encode()
_PG_STATEMENT = b"dodo_record_delivery"
_PG_FORMATS = [1 if c == "body" else 0 for c in COLUMNS]


def delivery_row(
    *,
    webhook_id: str,
    webhook_ts: int,
    headers: dict[str, str],
    body: bytes,
    event_type: str | None,
    event_at: datetime | None,
    dead_reason: str | None = None,
    subjects: Subjects = NO_SUBJECTS,
) -> dict[str, Any]:
    """The `webhook_events` row of a new delivery: pending and queued, or dead on arrival.

    `subjects`: whose it is, from the envelope the route parsed (`event_subjects`); without
    them the erasure finds the event by scanning its body instead of by index."""
    now = utcnow()
    return {
        "webhook_id": webhook_id,
        "type": event_type,
        "status": EventStatus.DEAD if dead_reason else EventStatus.PENDING,
        "attempts": 0,
        "last_error": dead_reason,
        "body": body,
        "headers": headers,
        "webhook_ts": webhook_ts,
        "event_at": event_at,
        "received_at": now,
        "enqueued_at": None if dead_reason else now,
        "customer_id": subjects.customer_id,
        "payment_id": subjects.payment_id,
    }


class Recorder:
    """Inserts each delivery once; `record` is False when its webhook id was already recorded.

    The one INSERT is the whole transaction, in autocommit: one round trip, answered by
    PostgreSQL after the commit reached the WAL. On PostgreSQL it runs on a psycopg connection
    the recorder holds per process and thread, as a statement prepared once per connection,
    not through SQLAlchemy, whose checkout, autocommit switch, execution path and reset cost
    as much CPU as the statement itself (docs/performance.md). A connection the server
    dropped is found on use, and the INSERT, idempotent on its key, is tried once more on a
    fresh one. Other databases (SQLite for `dodo-webhooks dev`) go through the engine.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._psycopg: dict[str, Any] | None = None
        if engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg":
            _, params = engine.dialect.create_connect_args(engine.url)
            params.pop("context", None)  # SQLAlchemy's adapters; psycopg's own are enough
            self._psycopg = {"connect_timeout": 5, **params, "autocommit": True}
        self._connections: PerThread[psycopg.Connection[Any]] = PerThread(self._connect)

    def record(self, **delivery: Any) -> bool:
        row = delivery_row(**delivery)
        if self._psycopg is None:
            return self._retry_once(lambda: _insert_sqlalchemy(self._engine, row))
        return self._insert_psycopg(row)

    def close(self) -> None:
        """Close this thread's connection (the others close with their process)."""
        conn = self._connections.drop()
        if conn is not None:
            conn.close()

    def _insert_psycopg(self, row: dict[str, Any]) -> bool:
        params = [_pg_param(c, row[c]) for c in COLUMNS]
        conn = self._connections.get()  # a database that cannot be reached raises: 503
        try:
            return _exec_insert(conn, params)
        except psycopg.errors.CheckViolation:
            # No partition of `event_bodies` for today (beat's purge makes them ahead, and
            # has not run): made now, and the INSERT, which wrote nothing, tried again.
            ensure_ahead(self._engine)
            return _exec_insert(conn, params)
        except psycopg.OperationalError:
            if conn.pgconn.status == pq.ConnStatus.OK:
                raise
        # A retry after a lost connection may find its own first INSERT committed: it then
        # answers "duplicate" and the delivery is queued by beat's re-drive instead.
        self.close()
        return _exec_insert(self._connections.get(), params)

    def _connect(self) -> psycopg.Connection[Any]:
        assert self._psycopg is not None
        conn = psycopg.connect(**self._psycopg)
        try:
            _check(conn, conn.pgconn.prepare(_PG_STATEMENT, _PG_INSERT))
        except Exception:
            conn.close()  # e.g. the table is not there yet: the next delivery tries again
            raise
        return conn

    @staticmethod
    def _retry_once(insert: Any) -> bool:
        try:
            return bool(insert())
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
        return bool(insert())


def _pg_param(column: str, value: Any) -> bytes | None:
    """A column's value as PostgreSQL's text input (the body as is: binary format)."""
    if value is None or column == "body":
        return value  # type: ignore[no-any-return]
    if column == "headers":
        return json.dumps(value).encode()
    if isinstance(value, datetime):
        return value.isoformat().encode()
    return str(value).encode()


def _exec_insert(conn: psycopg.Connection[Any], params: list[bytes | None]) -> bool:
    """One PQexecPrepared of the INSERT; True when it inserted the row.

    libpq's call through psycopg.pq rather than `conn.execute`: psycopg's cursor, query
    conversion and adapters cost twice the CPU of the round trip itself (docs/performance.md).
    """
    # A None parameter is SQL NULL (libpq's NULL pointer), which psycopg's stub leaves out.
    result = conn.pgconn.exec_prepared(_PG_STATEMENT, params, _PG_FORMATS)  # type: ignore[arg-type]
    _check(conn, result)
    return result.ntuples > 0


def _check(conn: psycopg.Connection[Any], result: PGresult) -> None:
    """Raise what psycopg would for a failed result: OperationalError for a lost connection."""
    if result.status in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
        return
    if conn.pgconn.status != pq.ConnStatus.OK:
        raise psycopg.OperationalError(
            result.error_message.decode(errors="replace").strip() or "connection lost"
        )
    raise psycopg.errors.error_from_result(result, encoding=conn.info.encoding)


def record_delivery(engine: Engine, **delivery: Any) -> bool:
    """Record one delivery through a recorder of its own (scripts and tests)."""
    recorder = Recorder(engine)
    try:
        return recorder.record(**delivery)
    finally:
        recorder.close()


def _insert_sqlalchemy(engine: Engine, row: dict[str, Any]) -> bool:
    table = cast(Table, WebhookEvent.__table__)
    insert = insert_once(engine.dialect.name, table, ("webhook_id",), ("webhook_id",))
    with engine.connect() as conn:
        autocommit = conn.execution_options(isolation_level="AUTOCOMMIT")
        return autocommit.execute(insert, row).first() is not None
