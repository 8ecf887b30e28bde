"""raw bodies apart from their events, by the day stored: retention drops a day whole

Revision ID: bodies_by_day
Revises: purge_in_place

`event_bodies` (webhook_id, stored_at, body, headers), partitioned by RANGE (stored_at) on
PostgreSQL, one partition per UTC day (shared/bodies.py): the ingest writes new bodies there,
and the purge drops a day's partition instead of rewriting its rows. Today's and the next
days' partitions are made here; beat's purge keeps them ahead. Rows recorded before keep
their body in `webhook_events.body`, which the purge empties in place as before: nothing is
copied, so the upgrade takes no time whatever the table's size. The purge in place now walks
`ix_webhook_events_body_in_row`, over only the rows holding a body (built CONCURRENTLY
before the index it replaces is dropped): the events of the partitions never enter it. On
SQLite the table is made (plain) and stays empty: the dev server keeps bodies in the row.
`purged_days`: each day dropped, when, and how many events and bytes went with it.
"""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa
from alembic import op

import shared.db

revision = "bodies_by_day"
down_revision = "purge_in_place"
branch_labels = None
depends_on = None


PURGEABLE = "status IN ('processed', 'ignored')"
# (name, column, predicate): the purge in place walks only rows holding their body.
NEW = ("ix_webhook_events_body_in_row", "processed_at", f"{PURGEABLE} AND body IS NOT NULL")
OLD = ("ix_webhook_events_processed_at", "processed_at", PURGEABLE)


def _swap(create: tuple[str, str, str], drop: tuple[str, str, str]) -> None:
    with op.get_context().autocommit_block():
        name, column, where = create
        op.create_index(
            name,
            "webhook_events",
            [column],
            postgresql_where=sa.text(where),
            sqlite_where=sa.text(where),
            postgresql_concurrently=True,
        )
        op.drop_index(drop[0], table_name="webhook_events", postgresql_concurrently=True)


def upgrade() -> None:
    _swap(NEW, OLD)
    if op.get_bind().dialect.name == "postgresql":
        # 0007 left a fifth of each page free for the purge's HOT update in place; the rows
        # keep no body now, and the purge in place that is left is not HOT (its index names
        # `body`): pages written from now on are filled.
        op.execute("ALTER TABLE webhook_events RESET (fillfactor)")
    op.create_table(
        "event_bodies",
        sa.Column("webhook_id", sa.String(length=255), nullable=False),
        sa.Column("stored_at", shared.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=True),
        sa.Column("headers", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("webhook_id", "stored_at", name=op.f("pk_event_bodies")),
        postgresql_partition_by="RANGE (stored_at)",
    )
    op.create_table(
        "purged_days",
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("purged_at", shared.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("events", sa.BigInteger(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("day", name=op.f("pk_purged_days")),
    )
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        from shared.bodies import AHEAD_DAYS, Day, day_of
        from shared.db import utcnow

        today = day_of(utcnow())
        for n in range(AHEAD_DAYS + 1):
            day = Day(today + timedelta(days=n))
            op.execute(
                f'CREATE TABLE "{day.name}" PARTITION OF event_bodies'
                f" FOR VALUES FROM ('{day.start.isoformat()}') TO ('{day.end.isoformat()}')"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # Back into the rows, so that no body is lost with the table.
        op.execute(
            "UPDATE webhook_events AS e SET body = b.body, headers = b.headers"
            " FROM event_bodies AS b WHERE b.webhook_id = e.webhook_id"
            " AND b.stored_at = e.received_at AND e.body IS NULL AND b.body IS NOT NULL"
        )
    op.drop_table("purged_days")
    op.drop_table("event_bodies")
    _swap(OLD, NEW)
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE webhook_events SET (fillfactor = 80)")
