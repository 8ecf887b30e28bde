"""data lifecycle: purged and erased events, the purge's counters, the erasure log

Revision ID: lifecycle
Revises: reconcile
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import shared.db

revision = "lifecycle"
down_revision = "reconcile"
branch_labels = None
depends_on = None

PURGEABLE = "purged_at IS NULL AND status IN ('processed', 'ignored')"


def upgrade() -> None:
    with op.batch_alter_table("webhook_events") as batch:
        batch.alter_column("body", existing_type=sa.LargeBinary(), nullable=True)
        batch.alter_column("headers", existing_type=sa.JSON(), nullable=True)
        batch.add_column(
            sa.Column("purged_at", shared.db.UTCDateTime(timezone=True), nullable=True)
        )
        batch.add_column(
            sa.Column("erased_at", shared.db.UTCDateTime(timezone=True), nullable=True)
        )
    op.create_index(
        "ix_webhook_events_purgeable",
        "webhook_events",
        ["processed_at"],
        postgresql_where=sa.text(PURGEABLE),
        sqlite_where=sa.text(PURGEABLE),
    )
    op.create_table(
        "lifecycle_counters",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_lifecycle_counters")),
    )
    op.create_table(
        "customer_erasures",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("customer_id", sa.String(length=255), nullable=False),
        sa.Column("started_at", shared.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("finished_at", shared.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("requested_by", sa.String(length=255), nullable=False),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_customer_erasures")),
    )
    op.create_index(
        op.f("ix_customer_erasures_customer_id"),
        "customer_erasures",
        ["customer_id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_customer_erasures_customer_id"), table_name="customer_erasures")
    op.drop_table("customer_erasures")
    op.drop_table("lifecycle_counters")
    op.drop_index("ix_webhook_events_purgeable", table_name="webhook_events")
    with op.batch_alter_table("webhook_events") as batch:
        batch.drop_column("erased_at")
        batch.drop_column("purged_at")
    # Purged rows have no body to restore: an empty one keeps the row (and its dedup).
    op.execute("UPDATE webhook_events SET body = '' WHERE body IS NULL")
    op.execute("UPDATE webhook_events SET headers = '{}' WHERE headers IS NULL")
    with op.batch_alter_table("webhook_events") as batch:
        batch.alter_column("headers", existing_type=sa.JSON(), nullable=False)
        batch.alter_column("body", existing_type=sa.LargeBinary(), nullable=False)
