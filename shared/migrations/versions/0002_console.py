"""the console's keyset index on webhook_events

Revision ID: console
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "console"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The console lists events newest first, a page at a time, by (received_at, webhook_id):
    # without this every page of an unfiltered list sorts the whole inbox.
    op.create_index(
        "ix_webhook_events_received_at_webhook_id",
        "webhook_events",
        ["received_at", "webhook_id"],
    )


def downgrade() -> None:
    op.drop_index("ix_webhook_events_received_at_webhook_id", table_name="webhook_events")
