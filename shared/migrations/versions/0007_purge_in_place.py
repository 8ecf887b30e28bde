"""the purge rewrites a row in its page: no index names a column the purge changes

Revision ID: purge_in_place
Revises: event_subjects

`ix_webhook_events_purgeable` (processed_at, over rows with `purged_at IS NULL`) and
`ix_webhook_events_unattributed` (received_at, over rows with `body IS NOT NULL` and no
subjects) named `purged_at` and `body` in their predicates, so every purge UPDATE was a
non-HOT update: a new row version elsewhere in the table and a new entry in each of the
table's indexes. Their successors leave those columns out (the purge walks from its stored
mark instead, shared/lifecycle.py). Built CONCURRENTLY before the old ones are dropped, so
the ingest keeps inserting and the erasure and the purge always have an index.

And the table's fillfactor becomes 80: a page is filled to 80% at insert, which leaves the
purge's smaller row version room beside the old one (a HOT update needs it in the same
page). It applies to pages written from now on; `ALTER TABLE … SET` takes a lock that does
not conflict with the ingest's INSERTs or the workers' UPDATEs.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "purge_in_place"
down_revision = "event_subjects"
branch_labels = None
depends_on = None

PURGEABLE = "status IN ('processed', 'ignored')"
NO_SUBJECTS = "customer_id IS NULL AND payment_id IS NULL"
OLD_PURGEABLE = f"purged_at IS NULL AND {PURGEABLE}"
OLD_UNATTRIBUTED = f"body IS NOT NULL AND {NO_SUBJECTS}"

# (name, column, predicate): the new ones, then the ones they replace.
NEW = [
    ("ix_webhook_events_processed_at", "processed_at", PURGEABLE),
    ("ix_webhook_events_no_subjects", "received_at", NO_SUBJECTS),
]
OLD = [
    ("ix_webhook_events_purgeable", "processed_at", OLD_PURGEABLE),
    ("ix_webhook_events_unattributed", "received_at", OLD_UNATTRIBUTED),
]


def _swap(create: list[tuple[str, str, str]], drop: list[tuple[str, str, str]]) -> None:
    with op.get_context().autocommit_block():
        for name, column, where in create:
            op.create_index(
                name,
                "webhook_events",
                [column],
                postgresql_where=sa.text(where),
                sqlite_where=sa.text(where),
                postgresql_concurrently=True,
            )
        for name, _, _ in drop:
            op.drop_index(name, table_name="webhook_events", postgresql_concurrently=True)


FILLFACTOR = 80


def upgrade() -> None:
    _swap(NEW, OLD)
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE webhook_events SET (fillfactor = {FILLFACTOR})")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE webhook_events RESET (fillfactor)")
    _swap(OLD, NEW)
