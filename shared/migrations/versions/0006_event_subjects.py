"""whose an event is: webhook_events.customer_id and payment_id, indexed for the erasure

Revision ID: event_subjects
Revises: change_feed

No backfill: rows recorded before this keep both NULL and are found by the erasure's scan
of their bodies until retention purges them (docs/data-lifecycle.md). The indexes are built
CONCURRENTLY on PostgreSQL: a plain CREATE INDEX would hold the ingest's INSERTs for as long
as it reads the whole table.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "event_subjects"
down_revision = "change_feed"
branch_labels = None
depends_on = None

NO_CUSTOMER = "customer_id IS NULL"
UNATTRIBUTED = "body IS NOT NULL AND customer_id IS NULL AND payment_id IS NULL"


def upgrade() -> None:
    with op.batch_alter_table("webhook_events") as batch:
        batch.add_column(sa.Column("customer_id", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("payment_id", sa.String(length=255), nullable=True))
    with op.get_context().autocommit_block():
        op.create_index(
            op.f("ix_webhook_events_customer_id"),
            "webhook_events",
            ["customer_id"],
            postgresql_concurrently=True,
        )
        op.create_index(
            "ix_webhook_events_payment_id",
            "webhook_events",
            ["payment_id"],
            postgresql_where=sa.text(NO_CUSTOMER),
            sqlite_where=sa.text(NO_CUSTOMER),
            postgresql_concurrently=True,
        )
        op.create_index(
            "ix_webhook_events_unattributed",
            "webhook_events",
            ["received_at"],
            postgresql_where=sa.text(UNATTRIBUTED),
            sqlite_where=sa.text(UNATTRIBUTED),
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    op.drop_index("ix_webhook_events_unattributed", table_name="webhook_events")
    op.drop_index("ix_webhook_events_payment_id", table_name="webhook_events")
    op.drop_index(op.f("ix_webhook_events_customer_id"), table_name="webhook_events")
    with op.batch_alter_table("webhook_events") as batch:
        batch.drop_column("payment_id")
        batch.drop_column("customer_id")
