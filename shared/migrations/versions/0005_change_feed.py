"""the change feed: changes, outbound deliveries and their attempts

Revision ID: change_feed
Revises: lifecycle
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import shared.db

revision = "change_feed"
down_revision = "lifecycle"
branch_labels = None
depends_on = None

SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "changes",
        sa.Column("seq", SEQ, autoincrement=True, nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("entity_id", sa.String(length=600), nullable=False),
        sa.Column("customer_id", sa.String(length=255), nullable=True),
        sa.Column("changed", sa.JSON(), nullable=False),
        sa.Column("before", sa.JSON(), nullable=True),
        sa.Column("after", sa.JSON(), nullable=False),
        sa.Column("cause_webhook_id", sa.String(length=255), nullable=False),
        sa.Column("cause_type", sa.String(length=255), nullable=False),
        sa.Column("cause_at", shared.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("created_at", shared.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_changes")),
        sa.UniqueConstraint("id", name=op.f("uq_changes_id")),
    )
    op.create_index("ix_changes_entity_seq", "changes", ["kind", "entity_id", "seq"])
    op.create_index(op.f("ix_changes_customer_id"), "changes", ["customer_id"])
    op.create_table(
        "outbound_deliveries",
        sa.Column("id", SEQ, autoincrement=True, nullable=False),
        sa.Column("change_seq", sa.BigInteger(), nullable=False),
        sa.Column("change_id", sa.String(length=64), nullable=False),
        sa.Column("url", sa.String(length=2000), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("entity_id", sa.String(length=600), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_until", shared.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("next_attempt_at", shared.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("delivered_at", shared.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("created_at", shared.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbound_deliveries")),
    )
    op.create_index(op.f("ix_outbound_deliveries_change_id"), "outbound_deliveries", ["change_id"])
    op.create_index(
        "ix_outbound_deliveries_url_entity",
        "outbound_deliveries",
        ["url", "kind", "entity_id", "change_seq"],
    )
    op.create_index(
        "ix_outbound_deliveries_status_next", "outbound_deliveries", ["status", "next_attempt_at"]
    )
    pending_failing = sa.text("status = 'pending' AND last_error IS NOT NULL")
    op.create_index(
        "ix_outbound_deliveries_failing",
        "outbound_deliveries",
        ["url"],
        postgresql_where=pending_failing,
        sqlite_where=pending_failing,
    )
    in_flight = sa.text("status = 'pending' AND lease_until IS NOT NULL")
    op.create_index(
        "ix_outbound_deliveries_in_flight",
        "outbound_deliveries",
        ["url", "lease_until"],
        postgresql_where=in_flight,
        sqlite_where=in_flight,
    )
    op.create_table(
        "outbound_attempts",
        sa.Column("id", SEQ, autoincrement=True, nullable=False),
        sa.Column("delivery_id", sa.BigInteger(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("started_at", shared.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("duration_ms", sa.Numeric(asdecimal=False), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("response_head", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbound_attempts")),
    )
    op.create_index(op.f("ix_outbound_attempts_delivery_id"), "outbound_attempts", ["delivery_id"])


def downgrade() -> None:
    op.drop_table("outbound_attempts")
    op.drop_table("outbound_deliveries")
    op.drop_table("changes")
